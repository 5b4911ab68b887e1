"""The sweep folder: sweep.json, best.yaml, plots and the table; the test split for the best trial only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from finetune import recipe as recipe_module
from finetune.sweep.space import flow, trial_recipe_dict
from finetune.sweep.study import FINISHED, STATE_NAMES, Setup, best_of, count_states, sweep_lock, write_json


def _trial_row(setup: Setup, trial) -> dict:
    by_key = {p.key: p for p in setup.params}
    params = {k: by_key[k].value_of(v) if k in by_key else v for k, v in trial.params.items()}
    value = trial.value
    if value is None and trial.intermediate_values:  # pruned: the best epoch it reached
        value = best_of([{"validation": {setup.recipe.sweep.metric: v}} for v in trial.intermediate_values.values()],
                        setup.recipe.sweep.metric)
    return {
        "number": trial.number,
        "state": STATE_NAMES[trial.state.name],
        "params": params,
        "value": value,
        "run_dir": str(setup.out / "trials" / str(trial.number)),
        "epochs": len(trial.intermediate_values),
        "seconds": trial.user_attrs.get("seconds"),
        **({"reason": _reason(trial)} if _reason(trial) else {}),
        **({"learned": False} if trial.user_attrs.get("learned") is False else {}),  # pruned: it learned nothing
    }


def _reason(trial) -> str | None:
    reason = trial.user_attrs.get("error") or trial.user_attrs.get("pruned")
    if reason is None and trial.state.name == "FAIL" and "seconds" not in trial.user_attrs:
        reason = "its worker stopped mid-trial (its heartbeat ran out)"  # failed by fail_stale_trials
    return reason


def write_report(setup: Setup, study, target: int, say) -> dict:
    from optuna.trial import TrialState

    with sweep_lock(setup.out):
        trials = study.get_trials(deepcopy=False)
        rows = [_trial_row(setup, t) for t in trials]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        counts = count_states(study)
        finished = sum(counts.get(state, 0) for state in FINISHED)
        done = finished >= target and not counts.get("RUNNING")
        previous = _read_json(setup.out / "sweep.json")
        report = {
            "study": setup.study_name,
            "storage": setup.storage_text,
            "metric": setup.recipe.sweep.metric,
            "direction": setup.direction,
            "split": "validation",
            "sampler": setup.recipe.sweep.sampler,
            "pruner": setup.recipe.sweep.pruner,
            "requested_trials": target,
            "finished": done,
            "space": {p.key: p.spec() for p in setup.params},
            "trials": rows,
            "best": None,
        }
        if complete:
            best = study.best_trial
            row = next(r for r in rows if r["number"] == best.number)
            report["best"] = {k: row[k] for k in ("number", "params", "value", "run_dir")}
            report["best"]["recipe"] = str(setup.out / "best.yaml")
            _write_best_yaml(setup, best.number, row["value"], row["params"])
            old_test = (previous.get("best") or {}).get("test")
            run_dir = Path(row["run_dir"])
            if not (run_dir / "config.yaml").is_file():  # run by a worker on another machine: its folder is there
                report["best"]["host"] = (best.user_attrs.get("worker") or {}).get("host")
            else:
                recipe, splits = _trial_data(run_dir)
                if old_test is not None and old_test.get("trial") == best.number:
                    report["best"]["test"] = old_test
                elif done:
                    report["best"]["test"] = _test_once(run_dir, recipe, splits, say)
                _card_for_best(run_dir, recipe, splits)
            report["test_note"] = (
                "the search saw validation values only; the test split is evaluated once, for the best trial only, "
                "when the study has finished" + ("" if done else " (not yet: trials are still to run)")
            )
        write_json(setup.out / "sweep.json", report)
        write_sweep_plots(study, setup, setup.out / "plots")
    print(format_table(report), flush=True)
    where = (f"best trial {report['best']['number']}: {setup.out / 'best.yaml'}" if report["best"]
             else "no trial completed")
    say(f"sweep: {sum(1 for r in rows if r['state'] in ('complete', 'pruned'))} finished trials; {where}; "
        f"{setup.out / 'sweep.json'}")
    return report


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_best_yaml(setup: Setup, number: int, value: float, params: dict) -> None:
    config = setup.out / "trials" / str(number) / "config.yaml"
    if config.is_file():
        raw = recipe_module.parse_yaml(config.read_text(), str(config))
    else:  # a trial another machine ran: its recipe made again, as run_trial made it
        raw = trial_recipe_dict(setup.base, params, config.parent)
    raw["output"]["dir"] = str(setup.out / "best")
    recipe = recipe_module.from_dict(raw, source=str(config))
    header = (
        f"# The best trial ({number}) of sweep study '{setup.study_name}': validation {setup.recipe.sweep.metric} "
        f"{value:.6g}.\n# finetune run {setup.out / 'best.yaml'} trains it again (into output.dir) and reaches the "
        "same validation value.\n"
    )
    (setup.out / "best.yaml").write_text(header + recipe_module.to_yaml(recipe))


def _trial_data(run_dir: Path):
    """A trial's recipe (its config.yaml) and the splits it defines, test included."""
    from finetune.tasks import get_task

    recipe = recipe_module.from_dict(
        recipe_module.parse_yaml((run_dir / "config.yaml").read_text(), str(run_dir / "config.yaml"))
    )
    return recipe, get_task(recipe.task).load_splits(recipe)


def _test_once(run_dir: Path, recipe, splits, say) -> dict | None:
    """The best trial's kept model on the test split its recipe defines (the first and only look at it), read and
    scored as `finetune eval` scores a run: by the task (texts, pairs, images, a tag per word)."""
    from finetune.loading import load_predictor
    from finetune.tasks import get_task

    task = get_task(recipe.task)
    if splits.test is None:
        return None
    predictor = load_predictor(run_dir)
    raw = splits.parts["test"]
    batch_size = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    scored = task.evaluate(predictor, raw, recipe, batch_size=batch_size)  # as `finetune eval` scores the split
    metrics, rows = {name: scored["metrics"][name] for name in recipe.eval.metrics}, scored["rows"]
    metrics_path = run_dir / "metrics.json"
    run_metrics = _read_json(metrics_path)
    if run_metrics:
        write_json(metrics_path, run_metrics | {"test": metrics})
    say("best trial on the test split: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return {"trial": int(run_dir.name), "rows": rows, **metrics}


def _card_for_best(run_dir: Path, recipe, splits) -> None:
    """The best trial's plots and model card, with its test metrics once it has them. Trials train without plots
    (drawing them took a third of a cached probe trial); the best one gets what any run folder has. Each report
    redraws them for the best trial so far, so a sweep stopped early still leaves a complete best model."""
    from finetune.model import KIT_FORMAT_FILE
    from finetune.model_folder import write_card

    model_dir = run_dir / "model"
    metrics = _read_json(run_dir / "metrics.json")
    if not metrics or not (model_dir / "README.md").is_file():
        return
    write_card(model_dir, recipe, splits, metrics, native=not (model_dir / KIT_FORMAT_FILE).is_file())


def write_sweep_plots(study, setup: Setup, directory: Path) -> list[Path]:
    """Optimisation history, parameter importances and a slice plot per parameter, by optuna's matplotlib plots;
    a plot that the trials so far cannot support (one completed trial has no importances) is left out."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as vis

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    directory.mkdir(exist_ok=True)
    drawn = [("history.png", lambda: vis.plot_optimization_history(study))]
    if len(setup.params) > 1 or len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) > 1:
        drawn.append(("importances.png", lambda: vis.plot_param_importances(study)))
    for param in setup.params:
        drawn.append((f"slice-{param.key}.png", lambda key=param.key: vis.plot_slice(study, params=[key])))
    written = []
    for name, draw in drawn:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
                axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.savefig(directory / name, dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(directory / name)
        except Exception as error:  # too few trials for a plot is not an error of the sweep
            print(f"sweep: plot {name} left out ({error.__class__.__name__}: {error})", file=sys.stderr)
    return written


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return flow(value)


def format_table(report: dict) -> str:
    keys = list(report["space"])
    header = ["trial", *keys, report["metric"], "state", "time"]
    lines = [header]
    best = (report.get("best") or {}).get("number")
    for row in report["trials"]:
        value = f"{row['value']:.4f}" if isinstance(row["value"], float) else "-"
        seconds = f"{row['seconds']:.0f}s" if isinstance(row.get("seconds"), (int, float)) else "-"
        mark = "*" if row["number"] == best else ""
        params = [_cell(row["params"][k]) if k in row["params"] else "-" for k in keys]
        state = row["state"] + (" (learned nothing)" if row.get("learned") is False else "")
        lines.append([f"{row['number']}{mark}", *params, value, state, seconds])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    test = (report.get("best") or {}).get("test")
    if test:
        text += f"\n* best trial; its test {report['metric']}: {test.get(report['metric'], float('nan')):.4f}"
    elif best is not None:
        text += "\n* best trial"
    return text
