"""Trainer and timm users met halfway: their names for our keys are answered with ours, and `--dotted.key=value`
is an override like `dotted.key=value`."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from conftest import call_main, one_error_line

from finetune import foreign_names
from finetune.cli import dashed_overrides
from finetune.errors import FinetuneError
from finetune.recipe import Recipe, from_dict

MINIMAL = {"task": "text-classification", "backbone": {"name": "minilm-l6"}, "data": {"train": "reviews.csv"}}
BUILTIN = "text/minilm-bbc-news"


def schema_keys(cls=Recipe, prefix: str = "") -> set[str]:
    keys = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kinds = [hints[field.name], *typing.get_args(hints[field.name])]
        section = next((kind for kind in kinds if dataclasses.is_dataclass(kind)), None)
        keys.add(prefix + field.name)
        if section is not None:
            keys |= schema_keys(section, f"{prefix}{field.name}.")
    return keys


def test_every_name_points_at_a_key_the_schema_has():
    keys = schema_keys()
    for _, table in foreign_names.TOOLS:
        for name, ours in table.items():
            if ours.startswith("nothing"):
                continue
            assert ours.split(" ")[0].split("=")[0] in keys, (name, ours)


@pytest.mark.parametrize(("where", "name", "ours"), [
    ("", "learning_rate", "train.lr"),
    ("", "num_train_epochs", "train.epochs"),
    ("train", "per_device_train_batch_size", "train.batch_size"),
    ("train", "gradient_accumulation_steps", "train.grad_accum"),
    ("train", "warmup_ratio", "train.warmup"),
    ("train", "lr_scheduler_type", "train.scheduler"),
    ("", "bf16", "train.precision=bf16"),
    ("data", "max_seq_length", "data.max_length"),
    ("train", "metric_for_best_model", "eval.select_best"),
    ("", "drop_path", "backbone.drop_path"),
    ("train", "model-ema", "train.ema"),
    ("train", "smoothing", "train.label_smoothing"),
    ("train", "mixup", "augment.mixup"),
])
def test_another_tools_name_is_answered_with_ours(where, name, ours):
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    (raw.setdefault(where, {}) if where else raw)[name] = 1
    with pytest.raises(FinetuneError) as error:
        from_dict(raw)
    message = str(error.value)
    assert f"{where + '.' if where else ''}{name}: unknown key" in message and f"here it is {ours}" in message


def test_our_own_key_in_its_section_is_not_called_foreign():
    assert foreign_names.hint("lr", "train") is None  # train.lr is ours; lr at the top is timm's
    assert foreign_names.hint("lr", "") is not None
    assert foreign_names.hint("max_length", "data") is None
    assert foreign_names.hint("no_such_name", "train") is None


def test_dashed_overrides_become_overrides_for_the_verbs_that_take_them():
    assert dashed_overrides(["run", "r.yaml", "--train.lr=3e-5", "--resume"]) == ["run", "r.yaml", "train.lr=3e-5",
                                                                                  "--resume"]
    assert dashed_overrides(["--debug", "validate", "r.yaml", "--learning_rate=3e-5"])[-1] == "learning_rate=3e-5"
    assert dashed_overrides(["sweep", "r.yaml", "--space=space.yaml"])[-1] == "--space=space.yaml"  # sweep's option
    assert dashed_overrides(["predict", "runs/x", "a text", "--batch-size=4"])[-1] == "--batch-size=4"


def test_validate_takes_dashed_overrides_and_names_our_key_for_theirs(capfd):
    result = call_main(capfd, "validate", BUILTIN, "--train.lr=3e-5", "--train.epochs=2")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["lr"] == 3e-5 and resolved["train"]["epochs"] == 2
    line = one_error_line(call_main(capfd, "validate", BUILTIN, "--learning_rate=3e-5"))
    assert "learning_rate: unknown key" in line and "here it is train.lr" in line
