"""`finetune sweep` workers beyond one process: a torchrun worker (every trial one 2-process run, rank 0 alone talking
to the study), and a database storage whose heartbeat fails a killed worker's trial so that a rerun completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import call_main, one_error_line, recipe_dict, subprocess_env, write_recipe

from finetune.sweep.trials import sweep

pytest.importorskip("optuna")


def sweep_recipe(tiny_bert, tiny_data, path: Path, out: Path, space: dict, **dotted) -> Path:
    raw = recipe_dict(tiny_bert, tiny_data, out, **dotted)
    raw["sweep"] = {"space": space, **raw.get("sweep", {})}
    return write_recipe(path, raw)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# slow (~25 s): a torchrun launch of two processes running two trials
@pytest.mark.slow
def test_a_torchrun_worker_runs_each_trial_as_one_two_process_run(tiny_bert, tiny_data, tmp_path):
    """torchrun x 2 with batch 4 each gives the trial values of one process with batch 8 (the tolerance of
    test_train's "2 processes == 1"), the pruned trial pruned on both ranks, one folder written by rank 0."""
    space = {"train.lr": {"choice": [3e-3, 1e-7]}}  # grid seed 1: the good lr first, then one pruned after epoch 1
    common = {"train.epochs": 3, "train.scheduler": "linear", "train.warmup": 1, "sweep.sampler": "grid",
              "sweep.seed": 1, "sweep.pruner": "median", "sweep.startup_trials": 1}
    one = sweep(str(sweep_recipe(tiny_bert, tiny_data, tmp_path / "one.yaml", tmp_path / "one", space,
                                 **common, **{"train.batch_size": 8})))

    two_dir = tmp_path / "parent" / "two"
    recipe = sweep_recipe(tiny_bert, tiny_data, tmp_path / "two.yaml", two_dir, space, **common)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "finetune", "sweep", str(recipe), "train.batch_size=4"]
    done = subprocess.run(command, check=False, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    two = read_json(two_dir / "sweep.json")

    assert [p.name for p in (tmp_path / "parent").iterdir()] == ["two"]
    assert sorted(p.name for p in (two_dir / "trials").iterdir()) == ["0", "1"]
    by_number = {t["number"]: t for t in one["trials"]}
    assert [t["number"] for t in two["trials"]] == [0, 1]  # each trial once: the ranks did not ask for their own
    for row in two["trials"]:
        single = by_number[row["number"]]
        assert row["params"] == single["params"] and row["state"] == single["state"]
        assert row["epochs"] == single["epochs"]
        assert row["value"] == pytest.approx(single["value"], abs=1e-5)
    assert {t["params"]["train.lr"]: t["state"] for t in two["trials"]} == {3e-3: "complete", 1e-7: "pruned"}
    metrics = read_json(two_dir / "trials" / "0" / "metrics.json")
    single_metrics = read_json(tmp_path / "one" / "trials" / "0" / "metrics.json")
    assert metrics["train"].get("processes", 2) == 2
    for a, b in zip(single_metrics["epochs"], metrics["epochs"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["validation"] == pytest.approx(a["validation"], abs=1e-5)
    assert "2 process(es)" in (two_dir / "trials" / "0" / "train.log").read_text()
    assert two["best"]["number"] == 0 and two["best"]["test"]["accuracy"] == pytest.approx(
        one["best"]["test"]["accuracy"], abs=1e-5)
    assert "2 processes per trial" in (two_dir / "sweep.log").read_text()
    assert done.stdout.count("sweep: study") == 1  # rank 0 alone speaks


# slow (the default suite's time): two processes for one error line
@pytest.mark.slow
def test_a_torchrun_worker_reports_bad_storage_once_on_every_rank(tiny_bert, tiny_data, tmp_path):
    """Rank 0 checks the storage; the other ranks get its error instead of waiting for a trial forever."""
    recipe = sweep_recipe(tiny_bert, tiny_data, tmp_path / "r.yaml", tmp_path / "sw",
                          {"train.lr": {"loguniform": [1e-4, 1e-2]}})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "finetune", "sweep", str(recipe), "--storage", "journal:/no/such/folder/x.journal"]
    done = subprocess.run(command, check=False, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert (done.stdout + done.stderr).count("--storage: 'journal:/no/such/folder/x.journal'") == 2  # both ranks
    # what the ranks wrote comes before torchrun's own report of the failed child (which has a traceback of its own)
    assert "Traceback" not in done.stderr.split("torch/distributed/elastic")[0]
    assert not (tmp_path / "sw").exists()


# slow (~20 s): a worker started, killed, and a rerun
@pytest.mark.slow
def test_a_killed_worker_on_a_database_fails_by_heartbeat_and_a_rerun_completes(tiny_bert, tiny_data, tmp_path):
    import optuna

    path = sweep_recipe(tiny_bert, tiny_data, tmp_path / "r.yaml", tmp_path / "sw",
                        {"train.lr": {"loguniform": [1e-4, 1e-2]}},
                        # validated on the training rows, which it learns (its 9 validation rows end "learned nothing")
                        **{"train.epochs": 40, "sweep.pruner": "none", "data.validation": str(tiny_data["train"])})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    env = subprocess_env(FINETUNE_SWEEP_HEARTBEAT="1,3")
    worker = subprocess.Popen([sys.executable, "-m", "finetune", "sweep", str(path), "--trials", "1", "--storage", url],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "sw" / "trials" / "0" / "train.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "epoch 2/40" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.poll() is None, worker.communicate()[0][-2000:]
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=3)  # as the worker opened it
    study = optuna.load_study(study_name="sw", storage=storage)
    (running,) = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    beats = [storage._get_stale_trial_ids(study._study_id)]  # recorded and fresh: not stale while it runs
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    killed_at = time.monotonic()
    assert beats == [[]]
    # as if the worker had run on another machine: the local dead-process check cannot see it, only the heartbeat
    storage.set_trial_user_attr(running._trial_id, "worker", {"host": "another-machine", "pid": 1})

    early = subprocess.run([sys.executable, "-m", "finetune", "sweep", str(path), "--trials", "1", "--storage", url],
                           env=subprocess_env(FINETUNE_SWEEP_HEARTBEAT="1,600"), capture_output=True, text=True,
                           timeout=300, check=False)
    assert early.returncode == 0, early.stderr[-2000:]
    assert "failed" not in early.stdout  # within the grace period the trial counts as running elsewhere
    assert read_json(tmp_path / "sw" / "sweep.json")["finished"] is False

    time.sleep(max(0.0, 3.5 - (time.monotonic() - killed_at)))
    rerun = subprocess.run([sys.executable, "-m", "finetune", "sweep", str(path), "--trials", "1", "--storage", url],
                           env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "trial 0: failed (no heartbeat from its worker for 3 s)" in rerun.stdout
    report = read_json(tmp_path / "sw" / "sweep.json")
    assert {t["number"]: t["state"] for t in report["trials"]} == {0: "failed", 1: "complete"}
    assert report["finished"] and report["best"]["number"] == 1
    assert "heartbeat" in report["trials"][0]["reason"]


@pytest.mark.parametrize("value", ["x", "0", "5,5", "1,2,3"])
def test_a_bad_heartbeat_setting_is_one_line(tiny_bert, tiny_data, tmp_path, capfd, monkeypatch, value):
    recipe = sweep_recipe(tiny_bert, tiny_data, tmp_path / "r.yaml", tmp_path / "sw",
                          {"train.lr": {"loguniform": [1e-4, 1e-2]}})
    monkeypatch.setenv("FINETUNE_SWEEP_HEARTBEAT", value)
    line = one_error_line(call_main(capfd, "sweep", recipe, "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}"))
    assert "$FINETUNE_SWEEP_HEARTBEAT" in line and f"'{value}'" in line
    assert not (tmp_path / "sw").exists() and not (tmp_path / "db.sqlite").exists()
