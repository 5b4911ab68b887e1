"""A convolutional model's training step on a CPU: the open layouts and precisions timed, the fastest used and
recorded, remembered per machine, kept on resume, and nothing measured where the recipe or the setup decides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from conftest import to_recipe
from test_predict import COLOURS, colour_image  # the same toy images

from finetune import step_choice
from finetune.recipe import from_dict
from finetune.train import train


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("step-colours")
    rng = np.random.RandomState(0)
    for split, count in (("train", 8), ("validation", 4)):
        for colour in COLOURS:
            (root / split / colour).mkdir(parents=True)
            for i in range(count):
                colour_image(colour, rng).save(root / split / colour / f"{i}.png")
    return root


def vision(colours: Path, out: Path, **train_keys) -> dict:
    return {
        "task": "image-classification",
        "backbone": {"name": "test_efficientnet", "pretrained": False, "dropout": 0.0},
        "head": {"type": "linear", "dropout": 0.0},
        "data": {"train": str(colours / "train"), "validation": str(colours / "validation"), "image_size": 32,
                 "num_workers": 0},
        "augment": {"scale": [1.0, 1.0], "hflip": 0.0},
        "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup": 0, "scheduler": "constant",
                  "precision": "fp32", "seed": 0, **train_keys},
        "output": {"dir": str(out)},
    }


def recipe_of(**train_keys):
    raw = {"task": "image-classification", "backbone": {"name": "test_efficientnet"}, "data": {"train": "x"},
           "train": train_keys}
    return from_dict(raw, source="test")


def test_the_candidates_are_what_the_recipe_leaves_open():
    assert step_choice.candidates(recipe_of(precision="auto"), native_bf16=True) == [
        ("no", False), ("no", True), ("bf16", False), ("bf16", True)]
    assert step_choice.candidates(recipe_of(precision="auto"), native_bf16=False) == [("no", False), ("no", True)]
    assert step_choice.candidates(recipe_of(precision="fp32"), native_bf16=True) == [("no", False), ("no", True)]
    assert step_choice.candidates(recipe_of(precision="bf16", channels_last=True), native_bf16=True) == [
        ("bf16", True)]
    assert step_choice.candidates(recipe_of(precision="fp32", channels_last=False), native_bf16=True) == [
        ("no", False)]


def test_the_fastest_layout_is_measured_used_recorded_and_remembered(colours, tmp_path):
    metrics = train(to_recipe(vision(colours, tmp_path / "a")))
    choice = metrics["train"]["step_choice"]
    assert choice["how"] == "measured" and choice["precision"] == "fp32"
    rates = choice["images_per_second"]
    assert set(rates) == {"fp32 contiguous", "fp32 channels_last"} and all(v > 0 for v in rates.values())
    assert choice["channels_last"] == (rates["fp32 channels_last"] > rates["fp32 contiguous"])  # the faster one
    assert "choosing the step" in metrics["train"]["phases"]
    log = (tmp_path / "a" / "train.log").read_text()
    assert "step: fp32 " in log and "measured now" in log
    progress = json.loads(next((tmp_path / "a" / "checkpoints").glob("step-*/progress.json")).read_text())
    assert progress["channels_last"] == choice["channels_last"]  # the layout the model really trained in
    cached = json.loads(step_choice.cache_path().read_text())
    assert len(cached) == 1 and next(iter(cached.values()))["channels_last"] == choice["channels_last"]

    again = train(to_recipe(vision(colours, tmp_path / "b")))["train"]  # the same setup: nothing timed again
    assert again["step_choice"]["how"] == "remembered" and "choosing the step" not in again["phases"]
    assert again["step_choice"]["channels_last"] == choice["channels_last"]


@pytest.mark.parametrize("layout", [False, True])
def test_the_remembered_choice_is_the_layout_trained_in(colours, tmp_path, layout):
    """Whatever the measurement says (here: written into the cache), the model trains in that layout, and learns."""
    train(to_recipe(vision(colours, tmp_path / "first", epochs=1)))
    cache = step_choice.cache_path()
    entries = json.loads(cache.read_text())
    for entry in entries.values():
        entry["channels_last"] = layout
    cache.write_text(json.dumps(entries))
    metrics = train(to_recipe(vision(colours, tmp_path / "run", epochs=4)))
    assert metrics["train"]["step_choice"]["channels_last"] is layout
    progress = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/progress.json")).read_text())
    assert progress["channels_last"] is layout
    losses = [epoch["loss"] for epoch in metrics["epochs"]]
    assert losses[-1] < losses[0] / 2


def test_a_resumed_run_keeps_its_layout_and_resumes_exactly(colours, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    chosen = train(to_recipe(vision(colours, whole)))["train"]["step_choice"]["channels_last"]

    def stop(epoch, metrics):  # a kill after the first epoch's checkpoint
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(to_recipe(vision(colours, cut)), on_epoch=stop)
    cache = step_choice.cache_path()  # the machine's measurement now says the other layout
    entries = json.loads(cache.read_text())
    for entry in entries.values():
        entry["channels_last"] = not chosen
    cache.write_text(json.dumps(entries))
    resumed = train(to_recipe(vision(colours, cut)), resume=True)["train"]
    assert resumed["step_choice"] == {"precision": "fp32", "channels_last": chosen, "how": "resumed",
                                      "images_per_second": {}}
    a, b = (load_file(out / "model" / "model.safetensors") for out in (whole, cut))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_nothing_is_measured_where_the_recipe_decides(colours, tmp_path):
    metrics = train(to_recipe(vision(colours, tmp_path / "a", channels_last=False)))
    assert "step_choice" not in metrics["train"] and "choosing the step" not in metrics["train"]["phases"]
    assert not step_choice.cache_path().exists()
    frozen = train(to_recipe(vision(colours, tmp_path / "b", freeze="backbone")))
    assert "step_choice" not in frozen["train"]  # a probe: the backbone's features, not its training step
