"""Where a run's time goes (metrics.json's train.phases and the log's last line), and the one-thread switch for a
small head trained on cached features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import before_where_to_look, recipe_dict, to_recipe

from finetune import transfer
from finetune.train import train

PROBE = {"train.freeze": "backbone", "head.pooling": "mean", "train.batch_size": 4, "train.epochs": 2,
         "head.dropout": 0.1}


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _probe(tiny_bert, tiny_data, out: Path, seen: list) -> dict:
    metrics = train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **PROBE)),
                    on_epoch=lambda epoch, validation: seen.append(torch.get_num_threads()))
    return metrics


def test_a_small_cached_head_trains_on_one_thread_with_the_same_numbers(tiny_bert, tiny_data, tmp_path, two_threads,
                                                                       monkeypatch):
    seen: list = []
    one = _probe(tiny_bert, tiny_data, tmp_path / "one", seen)
    assert "cached features" in (tmp_path / "one" / "train.log").read_text()
    assert seen == [1, 1]  # inside the training loop
    assert torch.get_num_threads() == 2  # and given back after it
    monkeypatch.setattr(transfer, "ONE_THREAD_WORK", 0)  # every head counts as large: torch's threads
    seen.clear()
    two = _probe(tiny_bert, tiny_data, tmp_path / "two", seen)
    assert seen == [2, 2]
    assert one["epochs"] == two["epochs"] and one["test"] == two["test"]


def test_a_run_that_trains_the_backbone_keeps_its_threads(make_recipe, two_threads):
    seen: list = []
    train(to_recipe(make_recipe(**{"train.epochs": 1})), on_epoch=lambda e, v: seen.append(torch.get_num_threads()))
    assert seen == [2]


def test_phases_add_up_to_the_run_and_the_log_says_them(make_recipe):
    raw = make_recipe(**{"train.epochs": 1})
    train(to_recipe(raw))
    out = Path(raw["output"]["dir"])
    info = json.loads((out / "metrics.json").read_text())["train"]
    phases = info["phases"]
    assert list(phases) == ["imports and checks", "data and model", "feature pass", "preparing", "training",
                            "test", "saving"]
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(phases.values()) == pytest.approx(info["wall_seconds"], abs=1e-6)
    start_up = sum(phases[k] for k in ("imports and checks", "data and model", "feature pass", "preparing"))
    assert info["start_up_seconds"] == pytest.approx(start_up)
    assert phases["training"] >= info["seconds"]  # the loop's own training time is inside it
    last = before_where_to_look((out / "train.log").read_text())[-1]
    assert last.startswith(f"time: {info['wall_seconds']:.1f} s from process start: start-up ")
