"""The training loop end to end on a tiny BERT: overfitting, equivalences, checkpoint selection, the run folder."""

from __future__ import annotations

import csv
import json
import shutil
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import LABELS, REGRESSION_TARGETS, recipe_dict, subprocess_env, to_recipe, write_csv, write_recipe
from safetensors.torch import load_file

import finetune
from finetune.train import latest_checkpoint, train

# ---------------------------------------------------------------------------------------------------------------
# helpers


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["sentence"] for r in rows], [r["topic"] for r in rows]


def read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


# The attention key bias adds the same q.b to every score of a row, which softmax cancels: its true gradient is 0, so
# what it gets is rounding noise, which Adam divides by its own size into lr-sized steps. Equal runs that add in a
# different order end with different key biases; nothing else depends on them.
GRADIENT_FREE = "attention.self.key.bias"


def assert_same_tensors(a: dict, b: dict, atol: float, rtol: float = 0.0, skip: str | None = None) -> None:
    assert sorted(a) == sorted(b)
    names = [name for name in a if not (skip and name.endswith(skip))]
    worst = {name: (a[name] - b[name]).abs().max().item() for name in names}
    bad = {name: diff for name, diff in worst.items() if not torch.allclose(a[name], b[name], atol=atol, rtol=rtol)}
    assert not bad, f"tensors differ beyond atol={atol}: {sorted(bad.items(), key=lambda kv: -kv[1])[:5]}"


def max_difference(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


@torch.no_grad()
def logits_of_loaded(directory: Path, texts: list[str]) -> tuple[torch.Tensor, dict]:
    model, tokenizer, spec = finetune.load(directory)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    output = model(**batch)
    return (output.logits if hasattr(output, "logits") else output).float(), spec


def shifted_labels_csv(source: Path, target: Path) -> Path:
    """The same texts with every label replaced by the next one: learning the training task makes these worse."""
    texts, labels = read_csv(source)
    shifted = [LABELS[(LABELS.index(label) + 1) % len(LABELS)] for label in labels]
    return write_csv(target, ["sentence", "topic"], list(zip(texts, shifted)))


def run(raw: dict, **kwargs) -> dict:
    return train(to_recipe(raw), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# one overfitting run, inspected by several tests


@pytest.fixture(scope="module")
def overfit_run(tiny_bert, tiny_data, tmp_path_factory):
    """16 examples, validated on the training file itself."""
    out = tmp_path_factory.mktemp("overfit") / "run"
    raw = recipe_dict(
        tiny_bert,
        tiny_data,
        out,
        **{"data.validation": str(tiny_data["train"]), "train.epochs": 8, "train.batch_size": 4},
    )
    metrics = run(raw)
    return out, metrics, raw


def test_overfit_sixteen_examples(overfit_run):
    _, metrics, _ = overfit_run
    losses = [epoch["loss"] for epoch in metrics["epochs"]]
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics["epochs"][-1]["validation"]["loss"] < 0.5 * metrics["epochs"][0]["validation"]["loss"]
    assert metrics["epochs"][-1]["validation"]["accuracy"] == 1.0
    assert metrics["best"]["accuracy"] == 1.0


def test_the_run_ends_saying_where_to_look_and_its_predict_command_works(overfit_run, capfd):
    import shlex

    from conftest import call_main

    out, _, _ = overfit_run
    last = (out / "train.log").read_text().splitlines()[-3:]
    assert last[0] == f"plots: {out / 'plots'}/ (also in the card, {out / 'model' / 'README.md'})"
    assert last[1] == f"curves: tensorboard --logdir {out / 'tensorboard'}" and (out / "tensorboard").is_dir()
    assert last[2].startswith(f"try it: finetune predict {out} ")
    command = shlex.split(last[2].removeprefix("try it: finetune "))
    result = call_main(capfd, *command)  # what the run suggests, run as written
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_validation_and_test_passes_say_their_progress_in_a_log_when_long(tiny_bert, tiny_data, tmp_path,
                                                                         monkeypatch, capfd):
    from finetune import progress

    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)  # every pass as long as one past 30 s
    raw = recipe_dict(tiny_bert, tiny_data, tmp_path / "run", **{"train.epochs": 1, "train.eval_batch_size": 4})
    run(raw)
    lines = capfd.readouterr().err.splitlines()  # stderr is no terminal here: plain lines
    assert any(line.startswith("validation: 1/") for line in lines), lines
    assert any(line.startswith("test: 1/") for line in lines), lines


def test_metrics_json_has_the_documented_keys(overfit_run, tiny_data):
    out, metrics, raw = overfit_run
    assert read_metrics(out) == json.loads(json.dumps(metrics))  # what train() returns is what it wrote
    wanted = raw.get("eval", {}).get("metrics") or ["accuracy", "f1_macro"]
    run_info = metrics["train"]
    for key in ("samples_per_second", "seconds", "peak_memory_mb"):
        assert isinstance(run_info[key], float) and run_info[key] > 0, key
    # samples/s counts training samples over training time only: 16 rows x 8 epochs
    assert run_info["samples_per_second"] == pytest.approx(16 * 8 / run_info["seconds"], rel=1e-6)
    assert [entry["epoch"] for entry in metrics["epochs"]] == list(range(1, 9))
    for entry in metrics["epochs"]:
        assert isinstance(entry["loss"], float) and math.isfinite(entry["loss"])
        assert set(wanted) <= set(entry["validation"])
    assert set(wanted) <= set(metrics["best"]) and isinstance(metrics["best"]["epoch"], int)
    assert set(wanted) <= set(metrics["test"])
    for value in [*metrics["best"].values(), *metrics["test"].values()]:
        assert math.isfinite(value)


def test_best_epoch_is_the_first_argmax_of_the_selection_metric(overfit_run):
    _, metrics, _ = overfit_run
    accuracy = [entry["validation"]["accuracy"] for entry in metrics["epochs"]]
    assert metrics["best"]["epoch"] == int(np.argmax(accuracy)) + 1
    assert metrics["best"] == {
        "epoch": metrics["best"]["epoch"],
        **metrics["epochs"][metrics["best"]["epoch"] - 1]["validation"],
    }


def test_run_folder_contents(overfit_run):
    out, _, raw = overfit_run
    for name in ("config.yaml", "metrics.json", "split.json", "model", "checkpoints"):
        assert (out / name).exists(), name
    assert not [p.name for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]
    # config.yaml is the resolved recipe: it loads back to the same thing
    assert to_recipe(yaml.safe_load((out / "config.yaml").read_text())) == to_recipe(raw)
    split = json.loads((out / "split.json").read_text())
    assert split["labels"] == LABELS
    assert {key: part["count"] for key, part in split["splits"].items()} == {"train": 16, "validation": 16, "test": 9}
    assert split["validation_held_out_from_train"] is False
    card = (out / "model" / "README.md").read_text()
    assert "pipeline" in card and "Best epoch" in card and all(label in card for label in LABELS)


def test_native_export_reproduces_the_test_metrics(overfit_run, tiny_data):
    """model/ is a BertForSequenceClassification with the label names, holding the weights metrics.json describes."""
    out, metrics, _ = overfit_run
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert [config["id2label"][str(i)] for i in range(3)] == LABELS
    texts, labels = read_csv(tiny_data["test"])
    logits, spec = logits_of_loaded(out / "model", texts)
    assert spec["labels"] == LABELS
    truth = torch.tensor([LABELS.index(label) for label in labels])
    loss = torch.nn.functional.cross_entropy(logits, truth).item()
    accuracy = (logits.argmax(-1) == truth).float().mean().item()
    assert loss == pytest.approx(metrics["test"]["loss"], abs=1e-5)
    assert accuracy == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# equivalences


def test_grad_accumulation_equals_the_larger_batch(tiny_bert, tiny_data, tmp_path):
    """2 x batch 4 with accumulation is batch 8: same data order, same loss scaling, same clipping and schedule."""
    common = {"train.epochs": 2, "train.scheduler": "cosine", "train.warmup": 0.25}
    big = run(recipe_dict(tiny_bert, tiny_data, tmp_path / "big", **common, **{"train.batch_size": 8}))
    accumulated = run(
        recipe_dict(tiny_bert, tiny_data, tmp_path / "acc", **common, **{"train.batch_size": 4, "train.grad_accum": 2})
    )
    small = run(recipe_dict(tiny_bert, tiny_data, tmp_path / "small", **common, **{"train.batch_size": 4}))

    assert_same_tensors(
        weights(tmp_path / "big" / "model"),
        weights(tmp_path / "acc" / "model"),
        atol=1e-6,
        rtol=1e-5,
        skip=GRADIENT_FREE,
    )
    for a, b in zip(big["epochs"], accumulated["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["validation"] == pytest.approx(b["validation"], abs=1e-6)
    # the control: without accumulation, batch 4 takes twice the steps and ends elsewhere
    assert max_difference(weights(tmp_path / "big" / "model"), weights(tmp_path / "small" / "model")) > 1e-3
    assert small["epochs"][-1]["loss"] != pytest.approx(big["epochs"][-1]["loss"], abs=1e-6)


def test_same_seed_same_run_other_seed_other_run(tiny_bert, tiny_data, tmp_path):
    common = {"train.epochs": 1, "train.batch_size": 4, "data.test": None}
    run(recipe_dict(tiny_bert, tiny_data, tmp_path / "a", **common))
    run(recipe_dict(tiny_bert, tiny_data, tmp_path / "b", **common))
    run(recipe_dict(tiny_bert, tiny_data, tmp_path / "c", **common, **{"train.seed": 1}))
    assert_same_tensors(weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model"), atol=0)
    assert max_difference(weights(tmp_path / "a" / "model"), weights(tmp_path / "c" / "model")) > 1e-4


def _scheduler_state(out: Path) -> dict:
    return torch.load(latest_checkpoint(out) / "scheduler.bin", weights_only=True)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_reaches_zero_at_the_last_step(tiny_bert, tiny_data, tmp_path, schedule):
    """The loop steps the scheduler once per optimizer step: total steps = ceil(batches / accum) x epochs."""
    raw = recipe_dict(
        tiny_bert,
        tiny_data,
        tmp_path / "run",
        **{
            "train.epochs": 2,
            "train.batch_size": 4,
            "train.grad_accum": 2,
            "train.scheduler": schedule,
            "train.warmup": 1,
            "train.head_lr": 1e-2,
            "data.test": None,
        },
    )
    run(raw)
    state = _scheduler_state(tmp_path / "run")
    assert state["last_epoch"] == 2 * 2  # 16 rows / (4 x 2) = 2 optimizer steps per epoch, 2 epochs
    assert state["_last_lr"] == pytest.approx([0.0] * len(state["_last_lr"]), abs=1e-12)
    assert sorted(set(state["base_lrs"])) == [1e-3, 1e-2]


# ---------------------------------------------------------------------------------------------------------------
# checkpoint selection and early stopping


def test_model_holds_the_best_epoch_not_the_last(tiny_bert, tiny_data, tmp_path):
    """Validation labels shifted by one class: the better the model learns train, the worse validation gets."""
    shifted = shifted_labels_csv(tiny_data["train"], tmp_path / "shifted.csv")
    out = tmp_path / "run"
    raw = recipe_dict(
        tiny_bert,
        tiny_data,
        out,
        **{"data.validation": str(shifted), "train.epochs": 6, "train.batch_size": 4, "eval.select_best": "loss",
           "eval.calibrate": None},  # the export is compared with the best checkpoint's weights
    )
    metrics = run(raw)
    losses = [entry["validation"]["loss"] for entry in metrics["epochs"]]
    best = metrics["best"]["epoch"]
    assert best == int(np.argmin(losses)) + 1
    assert metrics["best"]["loss"] == losses[best - 1]
    assert best < len(losses), f"the scenario needs a best epoch before the last: {losses}"
    assert losses[-1] > losses[best - 1] + 0.1

    exported = weights(out / "model")
    assert_same_tensors(exported, weights(out / "checkpoints" / "best"), atol=0)
    assert max_difference(exported, weights(latest_checkpoint(out))) > 1e-4
    texts, labels = read_csv(shifted)
    logits, _ = logits_of_loaded(out / "model", texts)
    truth = torch.tensor([LABELS.index(label) for label in labels])
    assert torch.nn.functional.cross_entropy(logits, truth).item() == pytest.approx(losses[best - 1], abs=1e-5)


def test_early_stopping_stops_after_patience_epochs_without_improvement(make_recipe):
    """An lr too small to change any prediction: accuracy never improves after epoch 1."""
    raw = make_recipe(
        **{
            "train.epochs": 6,
            "train.lr": 1e-12,
            "train.early_stopping": {"metric": "accuracy", "patience": 2},
            "data.test": None,
        }
    )
    metrics = run(raw)
    assert [entry["epoch"] for entry in metrics["epochs"]] == [1, 2, 3]
    assert metrics["best"]["epoch"] == 1
    assert (Path(raw["output"]["dir"]) / "model" / "model.safetensors").is_file()


def test_no_early_stopping_runs_every_epoch(make_recipe):
    metrics = run(make_recipe(**{"train.epochs": 3, "train.lr": 1e-12, "data.test": None}))
    assert len(metrics["epochs"]) == 3


# ---------------------------------------------------------------------------------------------------------------
# validation held out from train


def test_held_out_validation_is_stratified_and_recorded(make_recipe, tiny_data):
    raw = make_recipe(**{"data.validation": None, "data.test": None, "data.val_fraction": 0.25, "train.epochs": 1})
    run(raw)
    split = json.loads((Path(raw["output"]["dir"]) / "split.json").read_text())
    assert split["validation_held_out_from_train"] is True
    assert split["labels"] == LABELS
    train_rows, val_rows = split["splits"]["train"]["rows"], split["splits"]["validation"]["rows"]
    assert sorted(train_rows + val_rows) == list(range(16)) and not set(train_rows) & set(val_rows)
    assert len(val_rows) == 4
    _, labels = read_csv(tiny_data["train"])
    assert {labels[row] for row in val_rows} == set(LABELS)  # every class gives its share
    assert "test" not in split["splits"]


# ---------------------------------------------------------------------------------------------------------------
# other problems and heads


def test_multi_label_trains_and_exports(tiny_bert, multi_label_data, tmp_path):
    out = tmp_path / "run"
    raw = recipe_dict(
        tiny_bert,
        {"train": multi_label_data, "validation": multi_label_data, "test": multi_label_data},
        out,
        **{"head.problem": "multi_label", "head.threshold": 0.4, "train.epochs": 10, "train.batch_size": 4,
           "eval.calibrate": None},  # the recipe's threshold itself travels (test_calibration moves it with T)
    )
    metrics = run(raw)
    assert set(metrics["best"]) >= {"epoch", "f1_micro", "f1_macro", "accuracy"}
    assert metrics["epochs"][-1]["loss"] < 0.7 * metrics["epochs"][0]["loss"]
    assert metrics["best"]["f1_micro"] > 0.8
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert [config["id2label"][str(i)] for i in range(3)] == LABELS
    assert json.loads((out / "split.json").read_text())["labels"] == LABELS

    assert config["finetune"]["threshold"] == 0.4  # the trained threshold travels with the native folder ...

    texts, labels = read_csv(multi_label_data)
    alone = shutil.copytree(out / "model", tmp_path / "alone")  # ... and is read back without the run folder
    logits, spec = logits_of_loaded(alone, texts)
    assert spec["problem"] == "multi_label" and spec["threshold"] == 0.4
    assert finetune.load(alone).threshold == 0.4
    predicted = (torch.sigmoid(logits) > 0.4).long()
    truth = torch.tensor([[int(name in label.split("|")) for name in LABELS] for label in labels])
    assert (predicted == truth).all(-1).float().mean().item() == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)


def test_regression_exports_predictions_in_target_units(tiny_bert, regression_data, tmp_path):
    out = tmp_path / "run"
    raw = recipe_dict(
        tiny_bert,
        {"train": regression_data, "validation": regression_data, "test": regression_data},
        out,
        **{
            "head.problem": "regression",
            "train.epochs": 15,
            "train.batch_size": 4,
            "train.lr": 2e-3,
            "train.scheduler": "cosine",
        },
    )
    metrics = run(raw)
    assert set(metrics["best"]) >= {"epoch", "rmse", "mae", "r2"}
    target_std = float(np.std(list(REGRESSION_TARGETS.values())))
    assert metrics["best"]["rmse"] < 0.5 * target_std  # in the targets' units (4.1), not standardised ones (1.0)
    split = json.loads((out / "split.json").read_text())
    assert split["target"]["mean"] == pytest.approx(100.0)

    texts, targets = read_csv(regression_data)
    targets = torch.tensor([float(t) for t in targets])
    logits, spec = logits_of_loaded(out / "model", texts)
    predictions = logits.view(-1)
    assert spec["problem"] == "regression"
    assert abs(predictions.mean().item() - 100.0) < 1.0
    assert (predictions - targets).abs().max().item() < 3.0
    rmse = (predictions - targets).pow(2).mean().sqrt().item()
    assert rmse == pytest.approx(metrics["test"]["rmse"], abs=1e-3)

    from transformers import pipeline

    scores = [row["score"] for row in pipeline("text-classification", model=str(out / "model"))(texts[:3])]
    assert scores == pytest.approx(predictions[:3].tolist(), abs=1e-3)  # the pipeline applies no sigmoid


@pytest.mark.parametrize(
    "head",
    [{"type": "mlp", "hidden": [16], "pooling": "mean"}, {"type": "linear", "pooling": "cls"}],
    ids=["mlp-mean", "linear-cls"],
)
def test_kit_format_export_reloads_to_the_same_predictions(tiny_bert, tiny_data, tmp_path, head):
    out = tmp_path / "run"
    dotted = {f"head.{key}": value for key, value in head.items()}
    # eval.calibrate null: the reloaded model is compared with the best checkpoint's weights
    metrics = run(recipe_dict(tiny_bert, tiny_data, out, **dotted,
                              **{"train.epochs": 3, "train.batch_size": 4, "eval.calibrate": None}))
    spec = json.loads((out / "model" / "finetune.json").read_text())
    assert spec["format"] == "finetune" and spec["labels"] == LABELS
    assert spec["head"]["pooling"] == head["pooling"] and spec["head"]["type"] == head["type"]
    assert "finetune.load" in (out / "model" / "README.md").read_text()
    assert not list((out / "model").glob("*.py"))  # no code a loader must trust

    texts, labels = read_csv(tiny_data["test"])
    logits, loaded_spec = logits_of_loaded(out / "model", texts)
    truth = torch.tensor([LABELS.index(label) for label in labels])
    assert loaded_spec["labels"] == LABELS
    assert torch.nn.functional.cross_entropy(logits, truth).item() == pytest.approx(metrics["test"]["loss"], abs=1e-5)
    assert (logits.argmax(-1) == truth).float().mean().item() == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    model, _, _ = finetune.load(out / "model")
    best = weights(out / "checkpoints" / "best")
    assert_same_tensors({k: v for k, v in model.state_dict().items()}, best, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# two processes


# Against commit 7812b85 both launches fail: without a GPU, Accelerator() under torchrun stays single-process (each
# process trains alone and both write one folder), and end_training() destroyed the process group before the final
# wait_for_everyone(). The second launch sets what `accelerate launch --cpu` sets, isolating the second bug.
@pytest.mark.parametrize(
    "launcher_env",
    [
        pytest.param({}, id="torchrun"),
        pytest.param({"ACCELERATE_USE_CPU": "true"}, id="torchrun-cpu-flag", marks=pytest.mark.slow),
    ],
)
def test_two_processes_match_one_with_the_same_global_batch(tiny_bert, tiny_data, tmp_path, launcher_env):
    """torchrun x 2 (gloo on CPU) with batch 4 each is one process with batch 8: same weights, same metrics."""
    common = {"train.epochs": 2, "train.scheduler": "linear", "train.warmup": 1}  # warmup in steps: scaled per process
    one = tmp_path / "one"
    run(recipe_dict(tiny_bert, tiny_data, one, **common, **{"train.batch_size": 8}))

    two = tmp_path / "parent" / "two"
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_dict(tiny_bert, tiny_data, two, **common))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "finetune",
        "run",
        str(recipe),
        "train.batch_size=4",
    ]
    result = subprocess.run(
        command, check=False, env=subprocess_env(**launcher_env), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]

    assert [p.name for p in (tmp_path / "parent").iterdir()] == ["two"]  # one run folder, not one per process
    assert not [p.name for p in two.rglob("*") if p.name.endswith((".tmp", ".old"))]
    trained = weights(two / "model")
    assert_same_tensors(weights(one / "model"), trained, atol=1e-5, skip=GRADIENT_FREE)
    initial = weights(tiny_bert)
    assert max((trained[f"bert.{k}"] - initial[k]).abs().max().item() for k in initial) > 1e-3  # it did train
    single, double = read_metrics(one), read_metrics(two)
    assert double["train"].get("processes", 2) == 2
    assert [e["epoch"] for e in double["epochs"]] == [e["epoch"] for e in single["epochs"]]
    for a, b in zip(single["epochs"], double["epochs"]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["validation"] == pytest.approx(a["validation"], abs=1e-5)
    assert double["test"] == pytest.approx(single["test"], abs=1e-5)
    # the schedule counts the same optimizer steps: the same warmup, and it ends at 0
    assert _scheduler_state(two)["_last_lr"] == pytest.approx(_scheduler_state(one)["_last_lr"], abs=1e-9)
    assert (latest_checkpoint(two) / "random_states_1.pkl").is_file()  # the second process took part
