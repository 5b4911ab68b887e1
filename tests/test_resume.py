"""Exact resume and crash safety: a run killed at any point and resumed ends as if never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import recipe_dict, subprocess_env, to_recipe, write_recipe
from safetensors.torch import load_file

from finetune.errors import FinetuneError
from finetune.train import latest_checkpoint, train

RESUMABLE = {
    "backbone.dropout": 0.1,  # dropout draws from the RNG: its state must come back too
    "head.dropout": 0.1,
    "train.batch_size": 4,  # 4 steps per epoch
    "train.epochs": 3,
    "train.checkpoint_every": 3,  # mid-epoch checkpoints
    "train.scheduler": "cosine",
    "train.warmup": 2,
}


def outcome(out: Path) -> tuple[dict, dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train",):
        metrics.pop(key)
    return load_file(out / "model" / "model.safetensors"), metrics


def assert_identical(a: Path, b: Path) -> None:
    weights_a, metrics_a = outcome(a)
    weights_b, metrics_b = outcome(b)
    assert metrics_a == metrics_b
    assert sorted(weights_a) == sorted(weights_b)
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **RESUMABLE)))
    return out


def test_checkpoints_are_kept_up_to_the_limit(uninterrupted):
    kept = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert kept == ["best", "step-00000012"]


@pytest.mark.parametrize("stop_after", [1, 2])  # mid-epoch 1 (step 3) and the end of epoch 1 / mid epoch 2 (step 6)
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(uninterrupted, tiny_bert, tiny_data, tmp_path,
                                                                stop_after):
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **RESUMABLE)
    # stop early with a run whose schedule is the same but that is cut short by keeping only a prefix of checkpoints:
    # run it whole, then throw away everything after the chosen checkpoint, as a kill would have
    train(to_recipe(raw | {"train": raw["train"] | {"keep_checkpoints": 10}}))
    steps = sorted((out / "checkpoints").glob("step-*"))
    keep = steps[stop_after - 1]
    for later in steps[stop_after:]:
        subprocess.run(["rm", "-rf", str(later)], check=True)
    for name in ("model", "metrics.json"):
        subprocess.run(["rm", "-rf", str(out / name)], check=True)
    assert latest_checkpoint(out) == keep
    train(to_recipe(raw | {"train": raw["train"] | {"keep_checkpoints": 10}}), resume=True)
    assert "resumed from" in (out / "train.log").read_text()
    assert_identical(out, uninterrupted)


def test_sigkill_at_any_point_then_resume_equals_the_uninterrupted_run(uninterrupted, tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **RESUMABLE | {"train.checkpoint_every": 1})
    raw["train"]["epochs"] = 3
    path = write_recipe(tmp_path / "recipe.yaml", raw)
    code = ("from finetune.recipe import load_recipe; from finetune.train import train; "
            f"train(load_recipe({str(path)!r}))")
    child = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and latest_checkpoint(out) is None:
        time.sleep(0.01)
    time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (out / "metrics.json").exists(), "the run finished before the kill; nothing was tested"
    assert latest_checkpoint(out) is not None
    # the same recipe, but the uninterrupted run checkpointed every 3 steps: checkpoints do not change the result
    train(to_recipe(raw), resume=True)
    assert_identical(out, uninterrupted)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(uninterrupted, tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **RESUMABLE | {"train.keep_checkpoints": 10})
    train(to_recipe(raw))
    steps = sorted((out / "checkpoints").glob("step-*"))
    for later in steps[1:]:
        subprocess.run(["rm", "-rf", str(later)], check=True)
    for name in ("model", "metrics.json"):
        subprocess.run(["rm", "-rf", str(out / name)], check=True)
    # what a kill in the middle of writing step 6 leaves: a half-written temporary folder
    half = out / "checkpoints" / "step-00000006.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)
    assert latest_checkpoint(out) == steps[0]
    train(to_recipe(raw), resume=True)
    assert_identical(out, uninterrupted)


def test_resume_refuses_a_changed_recipe_and_a_finished_run(uninterrupted, tiny_bert, tiny_data, tmp_path):
    with pytest.raises(FinetuneError, match="has finished; nothing to resume"):
        train(to_recipe(recipe_dict(tiny_bert, tiny_data, uninterrupted, **RESUMABLE)), resume=True)
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **RESUMABLE)
    train(to_recipe(raw))
    (out / "metrics.json").unlink()
    with pytest.raises(FinetuneError, match=r"--resume: the recipe differs .*train.lr: 0.001 -> 0.002"):
        train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **RESUMABLE | {"train.lr": 2e-3})), resume=True)


def test_an_unfinished_run_folder_suggests_resume(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **RESUMABLE)
    train(to_recipe(raw))
    (out / "metrics.json").unlink()
    with pytest.raises(FinetuneError, match="pass --resume to continue it"):
        train(to_recipe(raw))


def test_a_non_finite_loss_stops_the_run_naming_the_step(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **RESUMABLE | {"train.lr": 1e30, "train.max_grad_norm": None})
    with pytest.raises(FinetuneError, match=r"the loss is not finite \(nan or inf\) at step \d+"):
        train(to_recipe(raw))
    assert not (out / "model").exists()


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tiny_bert, tiny_data, tmp_path):
    settings = RESUMABLE | {"train.checkpoint_every": None, "train.epochs": 25}  # long enough to interrupt
    whole = tmp_path / "whole"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, whole, **settings)))
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **settings)
    path = write_recipe(tmp_path / "recipe.yaml", raw)
    code = ("from finetune.recipe import load_recipe; from finetune.train import train; "
            f"train(load_recipe({str(path)!r}))")
    child = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and "epoch 1/25:" not in _read(out / "train.log"):
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    output, _ = child.communicate(timeout=120)
    assert child.returncode != 0 and "stopping at the next step with a checkpoint" in output
    assert not (out / "metrics.json").exists(), "the run finished before the interrupt; nothing was tested"
    assert latest_checkpoint(out) is not None and "--resume" in (out / "train.log").read_text()
    train(to_recipe(raw), resume=True)
    assert_identical(out, whole)


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


# ---------------------------------------------------------------------------------------------------------------
# Class imbalance


def test_auto_class_weights_lift_the_minority_class(tiny_bert, tmp_path):
    from conftest import _rows, write_csv

    skewed = {"food": 40, "sports": 4, "tech": 4}
    header = ["sentence", "topic"]
    data = {
        "train": write_csv(tmp_path / "train.csv", header, _rows(skewed, seed=0)),
        "validation": write_csv(tmp_path / "val.csv", header, _rows({k: 6 for k in skewed}, seed=1)),
        "test": write_csv(tmp_path / "test.csv", header, _rows({k: 6 for k in skewed}, seed=2)),
    }
    settings = {"train.epochs": 3, "train.batch_size": 8, "train.lr": 3e-3, "eval.metrics": ["f1_macro", "accuracy"]}
    results = {}
    for weights in (None, "auto"):
        out = tmp_path / f"run-{weights}"
        results[weights] = train(to_recipe(recipe_dict(tiny_bert, data, out, **settings,
                                                       **{"train.class_weights": weights})))
    # a short run on a 10:1 set: unweighted, the model leans to the majority; weighted, it must not
    def minority_predictions(metrics):  # test predictions of sports or tech (columns 1, 2 of the confusion matrix)
        return sum(row[1] + row[2] for row in metrics["confusion"]["matrix"])

    assert minority_predictions(results["auto"]) > minority_predictions(results[None]) + 2, results
    assert results["auto"]["test"]["f1_macro"] > results[None]["test"]["f1_macro"]


def test_class_weights_must_match_the_labels(tiny_bert, tiny_data, tmp_path):
    raw = recipe_dict(tiny_bert, tiny_data, tmp_path / "run", **{"train.class_weights": [1.0, 2.0]})
    with pytest.raises(FinetuneError, match=r"train.class_weights: 2 weights for 3 labels \(food, sports, tech\)"):
        train(to_recipe(raw))


# ---------------------------------------------------------------------------------------------------------------
# LoRA, and two processes


def test_lora_resume_equals_the_uninterrupted_run(tiny_bert, tiny_data, tmp_path):
    settings = RESUMABLE | {"lora": {"r": 4}, "train.keep_checkpoints": 10, "train.lr": 1e-2}
    whole = tmp_path / "whole"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, whole, **settings)))
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **settings)
    train(to_recipe(raw))
    _cut_after_first_checkpoint(out)
    train(to_recipe(raw), resume=True)
    assert_identical(out, whole)
    adapters = [load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, whole)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[1])


def _cut_after_first_checkpoint(out: Path, kept: int = 1) -> None:
    """What a kill after the first (or the `kept`-th) checkpoint leaves behind."""
    for later in sorted((out / "checkpoints").glob("step-*"))[kept:]:
        subprocess.run(["rm", "-rf", str(later)], check=True)
    for name in ("model", "adapter", "metrics.json"):
        subprocess.run(["rm", "-rf", str(out / name)], check=True)


def _torchrun(script: Path, recipe: Path, resume: bool) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(recipe), "resume" if resume else "fresh"]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# slow (40 s): two torchrun launches and a resume; 2 processes == 1 stays in the default suite (test_train)
@pytest.mark.slow
def test_two_process_resume_equals_the_uninterrupted_two_process_run(tiny_bert, tiny_data, tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(
        "import sys\nfrom finetune.recipe import load_recipe\nfrom finetune.train import train\n"
        "train(load_recipe(sys.argv[1]), resume=sys.argv[2] == 'resume')\n"
    )
    settings = RESUMABLE | {"train.batch_size": 2, "train.keep_checkpoints": 10}  # 2 x 2 per step: 4 steps/epoch
    whole, out = tmp_path / "whole", tmp_path / "run"
    _torchrun(script, write_recipe(tmp_path / "whole.yaml", recipe_dict(tiny_bert, tiny_data, whole, **settings)),
              False)
    recipe = write_recipe(tmp_path / "run.yaml", recipe_dict(tiny_bert, tiny_data, out, **settings))
    _torchrun(script, recipe, False)
    _cut_after_first_checkpoint(out)
    _torchrun(script, recipe, True)
    assert "resumed from" in (out / "train.log").read_text()
    assert_identical(out, whole)


# slow (the default suite's time): resume is tested exactly by default (kills, Ctrl-C, damaged checkpoints)
@pytest.mark.slow
def test_cli_resume_of_a_run_folder(uninterrupted, tiny_bert, tiny_data, tmp_path):
    from conftest import run_cli

    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **RESUMABLE | {"train.keep_checkpoints": 10})
    train(to_recipe(raw))
    _cut_after_first_checkpoint(out)
    refused = run_cli("run", str(write_recipe(tmp_path / "recipe.yaml", raw)))
    assert refused.returncode == 2 and "pass --resume to continue it" in refused.stderr
    resumed = run_cli("run", str(out), "--resume")  # the run folder stands for its own config.yaml
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_identical(out, uninterrupted)


@pytest.mark.parametrize("order", [{"train.group_by_length": True}, {"train.sampler": "balanced"}])
def test_resume_is_exact_with_the_other_training_orders(tiny_bert, tiny_data, tmp_path, order):
    settings = RESUMABLE | {"train.keep_checkpoints": 10} | order
    whole = tmp_path / "whole"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, whole, **settings)))
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **settings)
    train(to_recipe(raw))
    for later in sorted((out / "checkpoints").glob("step-*"))[2:]:  # keep step 3 (mid-epoch 1) and 4 (its end)
        subprocess.run(["rm", "-rf", str(later)], check=True)
    subprocess.run(["rm", "-rf", str(out / "model"), str(out / "metrics.json")], check=True)
    (out / "checkpoints" / "step-00000004" / "progress.json").unlink()  # incomplete: resume from mid-epoch 1
    train(to_recipe(raw), resume=True)
    assert "resumed from" in (out / "train.log").read_text() and "step-00000003" in (out / "train.log").read_text()
    assert_identical(out, whole)


def test_balanced_sampler_draws_the_minority_classes(tiny_bert, tmp_path):
    from conftest import _rows, write_csv
    from finetune.sampling import ClassBalancedSampler

    labels = ["a"] * 50 + ["b"] * 5 + ["c"] * 5
    sampler = ClassBalancedSampler(labels, seed=0)
    sampler.set_epoch(1)
    drawn = [labels[i] for i in sampler]
    assert min(drawn.count(x) for x in "abc") > 10  # about 20 each, not 50/5/5
    skewed = {"food": 40, "sports": 4, "tech": 4}
    header = ["sentence", "topic"]
    data = {split: write_csv(tmp_path / f"{split}.csv", header,
                             _rows(skewed if split == "train" else {k: 6 for k in skewed}, seed=i))
            for i, split in enumerate(["train", "validation", "test"])}
    metrics = train(to_recipe(recipe_dict(tiny_bert, data, tmp_path / "run",
                                          **{"train.sampler": "balanced", "train.epochs": 3,
                                             "train.batch_size": 8, "train.lr": 3e-3})))
    assert sum(row[1] + row[2] for row in metrics["confusion"]["matrix"]) > 2  # it predicts minority classes


def test_resume_accepts_a_run_started_before_a_key_was_added_but_not_a_changed_one(tiny_bert, tiny_data, tmp_path):
    import yaml

    from finetune.errors import FinetuneError
    from finetune.recipe import to_dict
    from finetune.checkpoints import check_same_recipe as _check_same_recipe

    recipe = to_recipe(recipe_dict(tiny_bert, tiny_data, tmp_path / "run"))
    older = to_dict(recipe)
    del older["train"]["fast_dropout"], older["train"]["log_with"]  # as written before those keys existed
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(older, sort_keys=False))
    _check_same_recipe(saved, recipe)  # their defaults now: the same run
    older["train"]["lr"] = 0.5
    saved.write_text(yaml.safe_dump(older, sort_keys=False))
    with pytest.raises(FinetuneError, match=r"train.lr: 0.5 -> 0.001"):
        _check_same_recipe(saved, recipe)
