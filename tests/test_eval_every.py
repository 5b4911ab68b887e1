"""train.eval_every (validation every N optimizer steps), train.max_steps, and the schedules that follow the
validation metric (reduce_lr_on_plateau, greedy), on a tiny BERT: 16 training rows in batches of 4, 4 steps per
epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LABELS, recipe_dict, to_recipe
from test_resume import _cut_after_first_checkpoint, assert_identical
from test_train import (
    assert_same_tensors,
    latest_checkpoint,
    logits_of_loaded,
    read_csv,
    shifted_labels_csv,
    weights,
)

from finetune.plots import evaluated_at
from finetune.runs import format_runs, run_summary
from finetune.train import train

STEPS = {"train.batch_size": 4}  # 16 rows: 4 optimizer steps per epoch


def run(raw: dict, **kwargs) -> dict:
    train(to_recipe(raw), **kwargs)
    return json.loads((Path(raw["output"]["dir"]) / "metrics.json").read_text())


def test_eval_every_validates_every_n_steps_and_after_the_last(make_recipe):
    raw = make_recipe(**STEPS, **{"train.epochs": 3, "train.eval_every": 5, "data.test": None})
    metrics = run(raw)
    assert [(e["epoch"], e["step"]) for e in metrics["epochs"]] == [(2, 5), (3, 10), (3, 12)]
    assert "step" in metrics["best"]
    log = (Path(raw["output"]["dir"]) / "train.log").read_text()
    assert "step 5 (epoch 2/3): train loss" in log
    assert evaluated_at(metrics["epochs"], metrics["best"]) == ([5, 10, 12], "step")


def test_eval_every_an_epoch_equals_validating_after_each_epoch(tiny_bert, tiny_data, tmp_path):
    """eval_every = the steps of an epoch evaluates where the epoch mode does: the same numbers, the same model."""
    by_epoch = recipe_dict(tiny_bert, tiny_data, tmp_path / "epochs", **STEPS, **{"backbone.dropout": 0.1})
    by_step = recipe_dict(tiny_bert, tiny_data, tmp_path / "steps", **STEPS,
                          **{"backbone.dropout": 0.1, "train.eval_every": 4})
    a, b = run(by_epoch), run(by_step)
    assert [e["validation"] for e in a["epochs"]] == [e["validation"] for e in b["epochs"]]
    assert [e["step"] for e in b["epochs"]] == [4, 8]
    assert a["test"] == b["test"]
    assert_same_tensors(weights(tmp_path / "epochs" / "model"), weights(tmp_path / "steps" / "model"), atol=0)


def test_the_kept_model_is_the_best_evaluation_between_epochs(tiny_bert, tiny_data, tmp_path):
    """Validation labels shifted by one class get worse as train is learnt: the best evaluation is an early step,
    and model/ holds that step's weights, not an epoch end's."""
    shifted = shifted_labels_csv(tiny_data["train"], tmp_path / "shifted.csv")
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **STEPS, **{
        "data.validation": str(shifted), "train.epochs": 4, "train.eval_every": 3, "eval.select_best": "loss",
        "data.test": None, "eval.calibrate": None,  # the export reproduces the kept evaluation's own loss
    })
    metrics = run(raw)
    losses = [e["validation"]["loss"] for e in metrics["epochs"]]
    steps = [e["step"] for e in metrics["epochs"]]
    assert steps == [3, 6, 9, 12, 15, 16]
    assert metrics["best"]["step"] == steps[int(np.argmin(losses))]
    assert metrics["best"]["step"] % 4 != 0, f"the scenario needs a best evaluation inside an epoch: {losses}"
    texts, labels = read_csv(shifted)
    logits, _ = logits_of_loaded(out / "model", texts)
    truth = torch.tensor([LABELS.index(label) for label in labels])
    assert torch.nn.functional.cross_entropy(logits, truth).item() == pytest.approx(min(losses), abs=1e-5)
    row = run_summary(out, out.parent)
    assert f"@step {metrics['best']['step']}" in format_runs([row])
    card = (out / "model" / "README.md").read_text()
    assert f"Best evaluation at step {metrics['best']['step']}" in card


def test_early_stopping_counts_evaluations(make_recipe):
    """An lr too small to change a prediction: accuracy never improves after the first evaluation."""
    raw = make_recipe(**STEPS, **{
        "train.epochs": 5, "train.lr": 1e-12, "train.eval_every": 3, "data.test": None,
        "train.early_stopping": {"metric": "accuracy", "patience": 2},
    })
    metrics = run(raw)
    assert [e["step"] for e in metrics["epochs"]] == [3, 6, 9]
    log = (Path(raw["output"]["dir"]) / "train.log").read_text()
    assert "has not improved for 2 evaluation(s) (every 3 steps)" in log
    assert latest_checkpoint(Path(raw["output"]["dir"])).name == "step-00000009"


def _scheduler_state(out: Path) -> dict:
    return torch.load(latest_checkpoint(out) / "scheduler.bin", weights_only=True)


def test_max_steps_ends_the_run_and_the_schedule_there(make_recipe):
    """max_steps 10 over 4-step epochs: 3 epochs, the last cut after 2 steps, and cosine reaches 0 at step 10 even
    though train.epochs says 1 (max_steps wins, as in the transformers Trainer)."""
    raw = make_recipe(**STEPS, **{"train.epochs": 1, "train.max_steps": 10, "train.scheduler": "cosine",
                                  "data.test": None})
    metrics = run(raw)
    out = Path(raw["output"]["dir"])
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert latest_checkpoint(out).name == "step-00000010"
    state = _scheduler_state(out)
    assert state["last_epoch"] == 10
    assert max(state["_last_lr"]) == pytest.approx(0.0, abs=1e-12)
    assert metrics["train"]["samples"] == 10 * 4


def test_max_steps_with_eval_every_evaluates_the_last_step(make_recipe):
    raw = make_recipe(**STEPS, **{"train.epochs": 3, "train.max_steps": 7, "train.eval_every": 3, "data.test": None})
    metrics = run(raw)
    assert [(e["epoch"], e["step"]) for e in metrics["epochs"]] == [(1, 3), (2, 6), (2, 7)]


def test_resume_with_eval_every_equals_the_uninterrupted_run(tiny_bert, tiny_data, tmp_path):
    """Checkpoints at steps 3, 6, ... between evaluations at 2, 4, ...: a run cut after any of them and resumed ends
    as the uninterrupted one, best evaluation included."""
    settings = {**STEPS, "backbone.dropout": 0.1, "head.dropout": 0.1, "train.epochs": 3, "train.eval_every": 2,
                "train.checkpoint_every": 3, "train.keep_checkpoints": 10, "train.scheduler": "cosine",
                "train.warmup": 2}
    out, whole = _cut_and_resume(tiny_bert, tiny_data, tmp_path, settings, kept=1)
    # kept step 3: mid-epoch, after the evaluation at step 2, before the one at 4
    assert sorted(p.name for p in (whole / "checkpoints").glob("step-*"))[:2] == ["step-00000003", "step-00000004"]
    assert_identical(out, whole)


def _cut_and_resume(tiny_bert, tiny_data, tmp_path: Path, settings: dict, kept: int) -> tuple[Path, Path]:
    """The run whole, then again cut after its `kept`-th checkpoint (as a kill leaves it) and resumed."""
    whole = tmp_path / "whole"
    run(recipe_dict(tiny_bert, tiny_data, whole, **settings))
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, tiny_data, out, **settings)
    run(raw)
    _cut_after_first_checkpoint(out, kept)
    assert latest_checkpoint(out) == out / "checkpoints" / sorted(p.name for p in
                                                                  (whole / "checkpoints").glob("step-*"))[kept - 1]
    run(raw, resume=True)
    return out, whole


def _lr_of(out: Path) -> float:
    state = torch.load(latest_checkpoint(out) / "optimizer.bin", weights_only=True)
    return max(group["lr"] for group in state["param_groups"])


@pytest.mark.parametrize("select", ["loss", "accuracy"])
def test_reduce_lr_on_plateau_follows_the_validation_metric(make_recipe, select):
    """The lr is cut after each evaluation that did not improve eval.select_best, in that metric's direction: the
    run's final lr is what ReduceLROnPlateau gives when fed the recorded validation values."""
    raw = make_recipe(**STEPS, **{
        "train.epochs": 3, "train.eval_every": 2, "train.lr": 3e-3, "eval.select_best": select, "data.test": None,
        "train.scheduler": "reduce_lr_on_plateau", "train.scheduler_args": {"patience": 0, "factor": 0.5},
    })
    metrics = run(raw)
    values = [e["validation"][select] for e in metrics["epochs"]]
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([param], lr=3e-3)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(reference, mode="min" if select == "loss" else "max",
                                                         patience=0, factor=0.5)
    for value in values:
        plateau.step(value)
    expected = reference.param_groups[0]["lr"]
    assert expected < 3e-3, f"the scenario needs a plateau: {values}"
    assert _lr_of(Path(raw["output"]["dir"])) == pytest.approx(expected)


def test_a_metric_driven_schedule_resumes_exactly(tiny_bert, tiny_data, tmp_path):
    settings = {**STEPS, "train.epochs": 3, "train.eval_every": 2, "train.lr": 3e-3, "train.checkpoint_every": 3,
                "train.keep_checkpoints": 10, "train.scheduler": "greedy",
                "train.scheduler_args": {"patience": 0, "min_lr": 1e-5}}
    # kept: step 6, after three evaluations, so the schedule has a history to come back
    out, whole = _cut_and_resume(tiny_bert, tiny_data, tmp_path, settings, kept=3)
    assert sorted(p.name for p in (whole / "checkpoints").glob("step-*"))[2] == "step-00000006"
    assert_identical(out, whole)
    assert _lr_of(out) == _lr_of(whole)


@pytest.mark.parametrize("key, value, message", [
    ("train.eval_every", 0, "train.eval_every: must be at least 1 step"),
    ("train.max_steps", 0, "train.max_steps: must be at least 1 step"),
])
def test_bad_step_counts_are_refused(make_recipe, key, value, message):
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match=message):
        to_recipe(make_recipe(**{key: value}))
