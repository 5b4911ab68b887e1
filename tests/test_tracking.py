"""train.log_with: accelerate's trackers with the recipe as the run's config; a missing package is one line."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from conftest import call_main, one_error_line, recipe_dict, to_recipe, write_recipe

from finetune.tracking import PACKAGES


def missing_tracker() -> tuple[str, str]:
    for name, (modules, package) in PACKAGES.items():
        if all(importlib.util.find_spec(module) is None for module in modules):
            return name, package
    pytest.skip("every tracker is installed here")


def test_a_missing_tracker_is_one_line_naming_the_key_and_the_package(tiny_bert, tiny_data, tmp_path, capfd):
    name, package = missing_tracker()
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_bert, tiny_data, out))
    for verb in ("run", "validate"):
        line = one_error_line(call_main(capfd, verb, recipe, f"train.log_with=[tensorboard, {name}]"))
        assert line.startswith(f"finetune: error: train.log_with: {name} is not installed") and package in line
    assert not out.exists()  # refused before the run folder is made


def test_an_unknown_tracker_name_is_a_recipe_error(tiny_bert, tiny_data, tmp_path, capfd):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_bert, tiny_data, tmp_path / "run"))
    line = one_error_line(call_main(capfd, "validate", recipe, "train.log_with=[wandbb]"))
    assert "train.log_with[0]" in line and "did you mean 'wandb'" in line


def test_tensorboard_logs_the_recipe_as_the_runs_config_and_none_logs_nothing(tiny_bert, tiny_data, tmp_path):
    from finetune.train import train

    logged, silent = tmp_path / "logged", tmp_path / "silent"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, logged, **{"train.epochs": 1, "train.lr": 2e-3})))
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, silent, **{"train.epochs": 1, "train.log_with": []})))
    assert not (silent / "tensorboard").exists()
    assert list((logged / "tensorboard").glob("events.out.tfevents.*"))  # the losses and metrics
    [saved] = (logged / "tensorboard").rglob("hparams.yml")  # the recipe as the run's config, key by key
    config = yaml.safe_load(saved.read_text())
    assert config["train.lr"] == 2e-3 and config["backbone.name"] == str(tiny_bert)
    assert config["train.log_with"] == "['tensorboard']"
