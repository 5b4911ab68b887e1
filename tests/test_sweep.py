"""`finetune sweep` on a tiny BERT: trials as runs, best.yaml reproducing the best value, pruning, shared journals,
killed workers, cached features across trials, and bad input as one line with nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import call_main, one_error_line, recipe_dict, run_cli, subprocess_env, to_recipe, write_csv, \
    write_recipe

from finetune.sweep.trials import sweep
from finetune.train import train


@pytest.fixture
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def sweep_recipe(tiny_bert, tiny_data, tmp_path, space: dict, name: str = "sweep.yaml", **dotted) -> Path:
    # validated on the training rows, which a 2-epoch tiny run learns (its 9 validation rows it does not): a trial
    # that learned nothing ends pruned (finetune.health)
    raw = recipe_dict(tiny_bert, tiny_data, tmp_path / "sw", **{"data.validation": str(tiny_data["train"]), **dotted})
    raw["sweep"] = {"space": space, **raw.get("sweep", {})}
    return write_recipe(tmp_path / name, raw)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# a small sweep, end to end


def test_a_sweep_writes_its_folder_and_best_yaml_reproduces_the_best_value(tiny_bert, tiny_data, tmp_path, capfd):
    space = {"train.lr": {"choice": [3e-3, 1e-6]}, "head.dropout": {"choice": [0.0]}}
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, space, **{"sweep.sampler": "grid", "sweep.pruner": "none"})
    done = call_main(capfd, "sweep", path, "--trials", "5")  # a grid of 2 caps the trials
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "sw"
    report = read_json(out / "sweep.json")
    assert report["metric"] == "accuracy" and report["direction"] == "maximize" and report["finished"]
    assert sorted(t["number"] for t in report["trials"]) == [0, 1]
    # 1e-6 learned nothing (finetune.health): pruned with that reason, never a result to rank
    assert {t["params"]["train.lr"]: t["state"] for t in report["trials"]} == {3e-3: "complete", 1e-6: "pruned"}
    assert next(t for t in report["trials"] if t["state"] == "pruned")["reason"].startswith("learned nothing: ")
    assert sorted(t["params"]["train.lr"] for t in report["trials"]) == [1e-6, 3e-3]
    best = report["best"]
    trials = {t["number"]: t for t in report["trials"]}
    assert best["value"] == max(t["value"] for t in trials.values())
    assert best["params"]["train.lr"] == 3e-3  # 1e-6 does not move a 2-epoch run off its first guess
    # the objective is the best epoch's validation value, not the last epoch's
    for number, row in trials.items():
        epochs = read_json(out / "trials" / str(number) / "metrics.json")["epochs"]
        assert row["value"] == max(e["validation"]["accuracy"] for e in epochs)
    # the test split: read for the best trial alone, once the study is complete
    assert best["test"]["trial"] == best["number"] and "accuracy" in best["test"]
    for number in trials:
        has_test = "test" in read_json(out / "trials" / str(number) / "metrics.json")
        assert has_test == (number == best["number"])
    assert "test split is evaluated once, for the best trial only" in report["test_note"]
    # trials train without plots; the best one gets them, and a card that shows its test result
    for number in trials:
        model_dir = out / "trials" / str(number) / "model"
        assert (model_dir / "plots" / "loss.png").is_file() == (number == best["number"])
        assert ("Test:" in (model_dir / "README.md").read_text()) == (number == best["number"])
    assert (out / "trials" / str(best["number"]) / "plots" / "loss.png").is_file()
    assert {p.name for p in (out / "plots").iterdir()} >= {"history.png", "slice-train.lr.png"}
    assert f"{best['number']}*" in done.stdout and "complete" in done.stdout  # the table

    listed = call_main(capfd, "ls", out)
    assert listed.returncode == 0 and "trials/0" in listed.stdout and "trials/1" in listed.stdout

    again = train(to_recipe(yaml.safe_load((out / "best.yaml").read_text())))
    assert again["best"]["accuracy"] == best["value"]  # exactly: the same run, in a fresh run folder
    assert again["test"]["accuracy"] == pytest.approx(best["test"]["accuracy"], abs=1e-9)
    assert (out / "best" / "model").is_dir()


@pytest.mark.parametrize("checkpoints", [True, False])
def test_a_trial_writes_no_resumable_checkpoint_but_keeps_its_best_weights(make_recipe, tmp_path, checkpoints):
    """A sweep's trials are never resumed (a rerun starts new ones), so they train with checkpoints=False: no
    accelerate state (model, AdamW moments, RNG) is written at each epoch's end, only the best epoch's weights."""
    seen = []

    def on_epoch(epoch, validation):
        seen.append(sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()))

    metrics = train(to_recipe(make_recipe(**{"train.epochs": 2})), on_epoch=on_epoch, checkpoints=checkpoints)
    assert len(seen) == 2 and all("best" in names for names in seen)
    assert all(any(n.startswith("step-") for n in names) == checkpoints for names in seen)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file() and metrics["best"]["epoch"] in (1, 2)


def test_rerunning_a_finished_sweep_runs_no_more_trials(tiny_bert, tiny_data, tmp_path, capfd):
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, {"train.lr": {"loguniform": [1e-4, 1e-2]}},
                        **{"train.epochs": 1, "sweep.sampler": "random", "sweep.seed": 0})
    first = sweep(str(path), trials=2)
    assert len(first["trials"]) == 2
    more = sweep(str(path), trials=3)  # resumes the study: one more
    assert [t["number"] for t in more["trials"]] == [0, 1, 2]
    again = sweep(str(path), trials=3)
    assert len(again["trials"]) == 3
    assert again["best"]["test"] == more["best"]["test"] or again["best"]["number"] != more["best"]["number"]


def test_a_hopeless_trial_is_pruned_past_half_its_epochs_and_its_folder_says_so(tiny_bert, tiny_data, tmp_path):
    # grid order is fixed by its seed: the good lr first, then one that cannot learn, pruned after epoch 2 of 3 (by
    # default the pruner waits past half of train.epochs)
    space = {"train.lr": {"choice": [3e-3, 1e-7]}}
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, space, **{
        "train.epochs": 3, "sweep.sampler": "grid", "sweep.seed": 1, "sweep.pruner": "median",
        "sweep.startup_trials": 1})
    report = sweep(str(path))
    rows = {t["params"]["train.lr"]: t for t in report["trials"]}
    assert rows[3e-3]["number"] == 0, "the grid's order changed; pick the seed that runs 3e-3 first"
    pruned = rows[1e-7]
    assert pruned["state"] == "pruned" and pruned["epochs"] == 2
    folder = Path(pruned["run_dir"])
    assert read_json(folder / "trial.json")["state"] == "pruned"
    assert "pruned by the median pruner after epoch 2" in (folder / "train.log").read_text()
    assert not (folder / "metrics.json").exists() and not (folder / "checkpoints").exists()
    assert rows[3e-3]["state"] == "complete" and report["best"]["number"] == 0
    from finetune.runs import find_runs, run_summary

    states = {run.name: run_summary(run, tmp_path / "sw")["status"] for run in find_runs(tmp_path / "sw")}
    assert states == {"0": "done", "1": "pruned"}


@pytest.mark.parametrize(("min_epochs", "reason", "epochs"), [(None, "learned nothing: ", 2), (1, "epoch 1: ", 1)])
def test_the_pruner_waits_min_epochs_and_never_stops_a_trial_after_its_last(tiny_bert, tiny_data, tmp_path,
                                                                             min_epochs, reason, epochs):
    """Two epochs: by default (2 // 2 + 1 = 2) the hopeless trial runs both, since pruning after the last epoch saves
    nothing and would throw away a finished trial (it ends pruned all the same, having learned nothing);
    sweep.min_epochs=1 prunes it after its first, as before."""
    space = {"train.lr": {"choice": [3e-3, 1e-7]}}
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, space, **{
        "train.epochs": 2, "sweep.sampler": "grid", "sweep.seed": 1, "sweep.pruner": "median",
        "sweep.startup_trials": 1, "sweep.min_epochs": min_epochs})
    rows = {t["params"]["train.lr"]: t for t in sweep(str(path))["trials"]}
    assert rows[3e-3]["number"] == 0 and rows[3e-3]["state"] == "complete"
    assert (rows[1e-7]["state"], rows[1e-7]["epochs"]) == ("pruned", epochs)
    assert rows[1e-7]["reason"].startswith(reason)
    assert rows[1e-7]["value"] < rows[3e-3]["value"]  # below the median: the pruner would have stopped it


def test_a_probe_sweep_computes_the_backbone_features_once(tiny_bert, tiny_data, tmp_path, feature_cache):
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, {"train.lr": {"loguniform": [1e-3, 1e-1]}}, **{
        "train.freeze": "backbone", "head.pooling": "mean", "train.epochs": 1, "sweep.sampler": "random",
        "sweep.seed": 0, "sweep.pruner": "none"})
    report = sweep(str(path), trials=3)
    logs = [(Path(t["run_dir"]) / "train.log").read_text() for t in sorted(report["trials"], key=lambda t: t["number"])]
    assert all("cached features" in log for log in logs)
    assert "computing train features" in logs[0]
    assert all("computing" not in log for log in logs[1:])
    assert "computing test features" not in "".join(logs)  # trials never touch the test split
    assert len(list(feature_cache.rglob("*.safetensors"))) == 2  # train and validation


def test_a_section_can_be_searched_and_switched_off(tiny_bert, tiny_data, tmp_path):
    space = {"lora": {"choice": [None, {"r": 2, "alpha": 4}]}, "lora.dropout": {"uniform": [0.0, 0.2]}}
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, space, **{
        "train.epochs": 1, "sweep.sampler": "grid", "sweep.pruner": "none"})
    with pytest.raises(Exception, match="grid needs choice or int"):
        sweep(str(path))
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, space, **{
        "train.epochs": 1, "sweep.sampler": "random", "sweep.seed": 3, "sweep.pruner": "none"})
    report = sweep(str(path), trials=4)
    for row in report["trials"]:
        config = yaml.safe_load((Path(row["run_dir"]) / "config.yaml").read_text())
        if row["params"]["lora"] is None:
            assert config["lora"] is None and "lora.dropout" not in row["params"]
        else:
            assert config["lora"]["r"] == 2 and config["lora"]["dropout"] == row["params"]["lora.dropout"]
            assert (Path(row["run_dir"]) / "adapter").is_dir()
    assert {row["params"]["lora"] is None for row in report["trials"]} == {True, False}


# ---------------------------------------------------------------------------------------------------------------
# several workers


def start_worker(path: Path, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", "sweep", str(path), *map(str, args)],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_two_workers_on_one_journal_run_the_requested_trials_between_them(tiny_bert, tiny_data, tmp_path):
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, {"train.lr": {"loguniform": [1e-4, 1e-2]}},
                        **{"train.epochs": 3, "sweep.pruner": "none"})  # trials long enough for both to start
    journal = tmp_path / "shared.journal"
    workers = [start_worker(path, "--trials", 4, "--storage", f"journal:{journal}") for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[-2000:] for o in outputs]
    report = read_json(tmp_path / "sw" / "sweep.json")
    assert sorted(t["number"] for t in report["trials"]) == [0, 1, 2, 3]  # each number once, no fifth trial
    assert {t["state"] for t in report["trials"]} == {"complete"}
    ran = [[n for n in range(4) if f"trial {n}: complete" in output] for output in outputs]
    assert sorted(ran[0] + ran[1]) == [0, 1, 2, 3] and ran[0] and ran[1]  # both worked, none twice
    assert sorted(p.name for p in (tmp_path / "sw" / "trials").iterdir()) == ["0", "1", "2", "3"]


@pytest.mark.slow
def test_a_killed_worker_leaves_a_failed_trial_and_a_rerun_completes_the_study(tiny_bert, tiny_data, tmp_path):
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, {"train.lr": {"loguniform": [1e-4, 1e-2]}},
                        **{"train.epochs": 30, "sweep.pruner": "none"})
    worker = start_worker(path, "--trials", 1)
    log = tmp_path / "sw" / "trials" / "0" / "train.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "epoch 1/30" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.poll() is None, worker.communicate()[0][-2000:]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    rerun = subprocess.run(check=False, args=[sys.executable, "-m", "finetune", "sweep", str(path), "--trials", "1",
                            ], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "trial 0: failed (its worker died)" in rerun.stdout
    report = read_json(tmp_path / "sw" / "sweep.json")
    states = {t["number"]: t["state"] for t in report["trials"]}
    assert states == {0: "failed", 1: "complete"} and report["best"]["number"] == 1 and report["finished"]


# ---------------------------------------------------------------------------------------------------------------
# bad input: exit 2, one line naming the key or the storage, nothing written


BAD_SPACES = [
    ({"train.lrr": {"loguniform": [1e-5, 1e-3]}}, "train.lrr: unknown key (did you mean 'lr'?)"),
    ({"lora.alhpa": {"int": [4, 8]}}, "lora.alhpa: unknown key (did you mean 'alpha'?)"),
    ({"train.lr": {"loguniform": [0, 1]}}, "sweep.space.train.lr: loguniform needs a lower bound above 0"),
    ({"head.dropout": {"uniform": [0.3, 0.1]}}, "sweep.space.head.dropout: uniform lower bound 0.3 is not below"),
    ({"train.batch_size": {"choice": []}}, "sweep.space.train.batch_size: choice needs a non-empty list"),
    ({"train.batch_size": {"int": [4.5, 8]}}, "sweep.space.train.batch_size: int needs two integers"),
    ({"train.lr": {"logunifrom": [1e-5, 1e-3]}}, "(did you mean 'loguniform'?)"),
    ({"head.dropout": {"uniform": [0.0, 1.5]}}, "head.dropout: must be in [0, 1)"),
    ({"output.dir": {"choice": ["a", "b"]}}, "sweep.space.output.dir: output.* is set by the sweep"),
    ({}, "sweep.space: nothing to search"),
]


@pytest.mark.parametrize(("space", "message"), BAD_SPACES, ids=[m for _, m in BAD_SPACES])
def test_a_bad_space_is_one_line_and_writes_nothing(tiny_bert, tiny_data, tmp_path, capfd, space, message):
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, space)
    line = one_error_line(call_main(capfd, "sweep", path))
    assert message in line
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("sweep.sampler=tpee", "sweep.sampler: 'tpee' is not one of tpe, random, grid (did you mean 'tpe'?)"),
    ("sweep.pruner=medain", "sweep.pruner: 'medain' is not one of median, hyperband, none (did you mean 'median'?)"),
    ("sweep.metric=f1", "sweep.metric: 'f1' is not in eval.metrics"),
    ("sweep.min_epochs=0", "sweep.min_epochs: must be >= 1 or null, got 0"),
])
def test_an_unknown_sampler_pruner_or_metric_is_one_line(tiny_bert, tiny_data, tmp_path, capfd, override, message):
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, {"train.lr": {"loguniform": [1e-5, 1e-3]}})
    assert message in one_error_line(call_main(capfd, "sweep", path, override))
    assert not (tmp_path / "sw").exists()


def test_a_space_file_replaces_the_section_and_is_checked(tiny_bert, tiny_data, tmp_path, capfd):
    raw = recipe_dict(tiny_bert, tiny_data, tmp_path / "sw")
    path = write_recipe(tmp_path / "plain.yaml", raw)
    assert "no sweep section" in one_error_line(call_main(capfd, "sweep", path))
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {loguniform: [1.0e-5, 1.0e-3]}\nhead.dropot: {uniform: [0, 0.3]}\n")
    line = one_error_line(call_main(capfd, "sweep", path, "--space", space))
    assert "head.dropot: unknown key (did you mean 'dropout'?)" in line
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("storage", ["sqlite:////no/such/folder/study.db", "journal:/no/such/folder/study.journal",
                                     "nosuchdb://host/x"])
def test_an_unreachable_storage_is_one_line_naming_it(tiny_bert, tiny_data, tmp_path, capfd, storage):
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, {"train.lr": {"loguniform": [1e-5, 1e-3]}})
    line = one_error_line(call_main(capfd, "sweep", path, "--storage", storage))
    assert "--storage: " in line and storage in line
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("change", ["space", "direction"])
def test_a_study_name_reused_with_another_space_or_direction_is_refused(tiny_bert, tiny_data, tmp_path, capfd,
                                                                         change):
    import optuna

    journal = tmp_path / "old.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    old = optuna.create_study(storage=storage, study_name="search",
                              direction="minimize" if change == "direction" else "maximize")
    signature = {"space": {"train.lr": {"loguniform": [1e-5, 1e-3]}}, "metric": "accuracy", "direction": "maximize"}
    old.set_user_attr("sweep", signature | ({"space": {"train.lr": {"uniform": [0.1, 0.2]}}} if change == "space"
                                            else {}))
    path = sweep_recipe(tiny_bert, tiny_data, tmp_path, {"train.lr": {"loguniform": [1e-5, 1e-3]}})
    before = journal.read_bytes()
    line = one_error_line(call_main(capfd, "sweep", path, "--storage", f"journal:{journal}", "--study", "search"))
    assert "--study: 'search'" in line and ("direction" if change == "direction" else "space") in line
    assert journal.read_bytes() == before and not (tmp_path / "sw").exists()


def test_the_best_pair_trials_test_score_reads_both_texts(tiny_bert, tmp_path, capfd):
    """The test look at the best trial scores pairs as pairs: it equals the trial's own run's test metric, which a
    model reading the first text alone could not reach."""
    from test_pairs import pair_rows

    header = ["premise", "hypothesis", "relation"]
    data = {key: write_csv(tmp_path / f"{key}.csv", header, pair_rows(count, seed))
            for seed, (key, count) in enumerate((("train", 96), ("validation", 24), ("test", 24)))}
    raw = recipe_dict(tiny_bert, data, tmp_path / "sw", **{
        "data.text_column": "premise", "data.text_pair_column": "hypothesis", "data.label_column": "relation",
        "train.epochs": 8, "sweep.sampler": "grid", "sweep.pruner": "none"})
    raw["sweep"]["space"] = {"train.lr": {"choice": [3e-3]}}
    done = call_main(capfd, "sweep", write_recipe(tmp_path / "pairs.yaml", raw), "--trials", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    best = read_json(tmp_path / "sw" / "sweep.json")["best"]
    again = train(to_recipe(yaml.safe_load((tmp_path / "sw" / "best.yaml").read_text())))
    assert best["test"]["accuracy"] == pytest.approx(again["test"]["accuracy"], abs=1e-9)
    assert best["test"]["accuracy"] >= 0.8  # the first text alone is at chance (1/3)


def test_trials_that_keep_failing_stop_the_sweep_with_one_line(tiny_bert, tiny_data, tmp_path):
    """Failed trials are not finished ones: a sweep whose every trial fails (data of one label) would run forever."""
    one_label = write_csv(tmp_path / "one.csv", ["sentence", "topic"], [("the soup was fine", "food")] * 12)
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    path = sweep_recipe(tiny_bert, {**tiny_data, "train": one_label}, tmp_path, space)
    done = run_cli("sweep", path, "--trials", "5")  # a real process: its stderr is the user's
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]  # optuna logs "A new study created" before it
    assert line.startswith("finetune: error: sweep:") and "3 trials in a row failed" in line
    assert "only 1 label" in line and "rerun the same command" in line
    assert [n for n in range(5) if f"trial {n}: failed" in done.stdout] == [0, 1, 2]  # then it stopped


def test_workers_on_one_machine_share_its_cores(tmp_path, monkeypatch):
    """A worker that sees another live worker's running trial on this machine takes half the cores; OMP_NUM_THREADS
    set by the user wins. (Two workers at all cores each trained 20x slower than one.)"""
    import socket

    import optuna
    import torch

    from finetune.sweep.trials import Ranks, share_cores

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.journal")))
    study = optuna.create_study(storage=storage, study_name="s")
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(cores)
        assert share_cores(study, Ranks()) is None  # alone: all cores, as torch had them
        other = study.ask()  # a trial of another live process on this machine (pytest's parent)
        other.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getppid()})
        line = share_cores(study, Ranks())
        assert torch.get_num_threads() == max(1, cores // 2)
        assert (line is None) == (cores == 1) and (line is None or "2 workers on this machine" in line)
        gone = study.ask()  # a dead worker's trial does not count
        gone.set_user_attr("worker", {"host": socket.gethostname(), "pid": 2 ** 22 + 1})
        share_cores(study, Ranks())
        assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(cores)
        assert share_cores(study, Ranks()) is None and torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)
