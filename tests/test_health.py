"""A run that learned nothing says so: its warning line, metrics.json's health, `ls`, the card; a learning run is
silent. Tiny BERT runs on labels made unlearnable, on a collapsing lr, and on the learnable toy set."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, _rows, before_where_to_look, recipe_dict, to_recipe, write_csv
from test_token_task import conll, tagger_backbone, token_raw  # noqa: F401 (fixtures)

from finetune import health, problems
from finetune.runs import find_runs, format_runs, run_summary
from finetune.train import train

WARNING = "warning: this run learned nothing"


def shuffled_data(root, seed: int = 0) -> dict:
    """The toy set's texts with labels drawn at random: nothing in a text says its label."""
    rng = random.Random(seed)
    data = {}
    for split, counts, rows_seed in (("train", 8, 10), ("validation", 6, 11), ("test", 4, 12)):
        rows = [(text, rng.choice(LABELS)) for text, _ in _rows({k: counts for k in LABELS}, seed=rows_seed)]
        data[split] = write_csv(root / f"{split}.csv", ["sentence", "topic"], rows)
    return data


def run(raw: dict, **kwargs) -> dict:
    return train(to_recipe(raw), plots=False, **kwargs)


def raw_dir(raw: dict) -> Path:
    return Path(raw["output"]["dir"])


def log_of(raw: dict) -> str:
    return (raw_dir(raw) / "train.log").read_text()


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_data, tmp_path_factory):
    """Three runs in one folder: on random labels, at a collapsing lr, and a learning one."""
    root = tmp_path_factory.mktemp("health")
    made = {}
    settings = {
        "unlearnable": (shuffled_data(tmp_path_factory.mktemp("shuffled")), {"train.epochs": 6}),
        "collapsed": (tiny_data, {"train.lr": 1.0, "train.epochs": 2}),
        "learning": (tiny_data, {"train.epochs": 6, "data.validation": str(tiny_data["train"])}),
    }
    for name, (data, dotted) in settings.items():
        raw = recipe_dict(tiny_bert, data, root / name, **dotted)
        made[name] = (raw, run(raw))
    return root, made


def test_unlearnable_labels_say_so(runs):
    _, made = runs
    raw, metrics = made["unlearnable"]
    found = metrics["health"]
    print("unlearnable", found)
    assert found["learned"] is False and found["reasons"]
    assert found["best_validation_loss"] >= found["baseline_loss"] * (1 - health.TOLERANCE)
    written = json.loads((raw_dir(raw) / "metrics.json").read_text())
    assert written["health"] == json.loads(json.dumps(found))
    assert log_of(raw).count(WARNING) == 1
    # the run ends with it, before the lines saying where the model is and how long each phase took
    last = before_where_to_look(log_of(raw))[-3:]
    assert last[0].startswith(WARNING) and last[1].startswith("model saved to") and last[2].startswith("time: ")
    assert "train.lr" in log_of(raw) and "finetune validate" in log_of(raw)


def test_a_collapsing_lr_says_so(runs):
    _, made = runs
    raw, metrics = made["collapsed"]
    found = metrics["health"]
    print("collapsed", found)
    assert found["learned"] is False
    assert found["distinct_predictions"] == 1
    assert any("single class" in reason for reason in found["reasons"])
    assert all(entry["distinct_predictions"] == 1 and entry["distinct_truths"] == 3 for entry in metrics["epochs"])
    assert log_of(raw).count(WARNING) == 1


def test_a_learning_run_stays_silent(runs):
    _, made = runs
    raw, metrics = made["learning"]
    found = metrics["health"]
    print("learning", found)
    assert found == {"learned": True, "reasons": [], "baseline_loss": pytest.approx(problems.entropy([6, 5, 5])),
                     "best_validation_loss": found["best_validation_loss"], "distinct_predictions": 3}
    assert found["best_validation_loss"] < 0.5 * found["baseline_loss"]
    assert "learned nothing" not in log_of(raw)
    assert "learned nothing" not in (raw_dir(raw) / "model" / "README.md").read_text()


def test_ls_shows_which_runs_learned_nothing(runs):
    root, _ = runs
    rows = [run_summary(path, root) for path in find_runs(root)]
    assert {row["run"]: row["learned"] for row in rows} == {"collapsed": False, "learning": True, "unlearnable": False}
    lines = {line.split()[0]: line for line in format_runs(rows).splitlines()[1:]}
    assert "learned nothing" in lines["collapsed"] and "learned nothing" in lines["unlearnable"]
    assert "learned nothing" not in lines["learning"]


def test_the_card_says_so(runs):
    _, made = runs
    card = (raw_dir(made["collapsed"][0]) / "model" / "README.md").read_text()
    line = next(line for line in card.splitlines() if "learned nothing" in line)
    assert "single class" in line and "train.lr" in line


def test_a_tagger_that_tags_every_word_o_says_so(tagger_backbone, conll, tmp_path):  # noqa: F811 (fixtures)
    raw = token_raw(tagger_backbone, conll, tmp_path / "run")
    raw["train"].update(lr=1.0, epochs=2)
    found = run(raw)["health"]
    print("tagger", found)
    assert found["learned"] is False and found["distinct_predictions"] == 1
    assert any("single tag" in reason for reason in found["reasons"])
    assert log_of(raw).count(WARNING) == 1


# ---------------------------------------------------------------------------------------------------------------
# the judgement and the problems' knowledge, without training


def test_assess_on_histories():
    def entry(loss, predicted=2, truths=2):
        return {"validation": {"loss": loss}, "distinct_predictions": predicted, "distinct_truths": truths}

    assert health.assess([entry(0.40), entry(0.30)], math.log(2))["learned"] is True
    stuck = health.assess([entry(0.70), entry(0.69)], math.log(2))
    assert stuck["learned"] is False and stuck["best_validation_loss"] == 0.69 and len(stuck["reasons"]) == 1
    one = health.assess([entry(0.5, predicted=1), entry(0.4, predicted=1)], math.log(2))
    assert one["learned"] is False and "single class" in one["reasons"][0]
    # a validation split of one class: predicting only it is right
    assert health.assess([entry(0.1, predicted=1, truths=1)], math.log(2))["learned"] is True
    # EMA weights that learned count
    ema = {"validation": {"loss": 0.69}, "validation_ema": {"loss": 0.3}}
    assert health.assess([ema], math.log(2))["learned"] is True
    assert health.warning({"learned": True}) is None


def test_baselines_per_problem():
    single, multi, regression, tags = (problems.get(name) for name in ("single_label", "multi_label", "regression",
                                                                        "tags"))
    assert single.baseline_loss([0, 1, 0, 1], 2) == pytest.approx(math.log(2))
    assert single.baseline_loss([0, 0, 0, 1], 2) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    # each label's own prior: one always on (entropy 0), one half the time (ln 2)
    assert multi.baseline_loss([[1.0, 0.0], [1.0, 1.0]], 2) == pytest.approx(math.log(2) / 2)
    assert regression.baseline_loss([-1.0, 1.0], 0) == 1.0
    assert tags.baseline_loss([[0, 1], [0, 0, 1, 1]], 2) == pytest.approx(math.log(2))
    assert single.distinct(np.array([2, 2, 2])) == 1
    assert multi.distinct(np.array([[0, 1], [0, 1], [1, 1]])) == 2
    assert regression.distinct(np.array([0.1, 0.2])) is None


# ---------------------------------------------------------------------------------------------------------------
# a sweep: a trial that learned nothing is not a result to rank


def test_a_sweep_records_a_trial_that_learned_nothing_as_pruned(tiny_bert, tiny_data, tmp_path):
    from conftest import write_recipe

    from finetune.sweep.report import format_table
    from finetune.sweep.trials import sweep

    raw = recipe_dict(tiny_bert, tiny_data, tmp_path / "sw", **{"sweep.sampler": "grid", "sweep.pruner": "none",
                                                                "data.validation": str(tiny_data["train"]),
                                                                "train.epochs": 4})
    raw["sweep"]["space"] = {"train.lr": {"choice": [3e-3, 1.0]}}
    report = sweep(str(write_recipe(tmp_path / "sweep.yaml", raw)), trials=2)
    rows = {row["params"]["train.lr"]: row for row in report["trials"]}
    assert rows[3e-3]["state"] == "complete" and "reason" not in rows[3e-3]
    assert rows[1.0]["state"] == "pruned" and rows[1.0]["reason"].startswith("learned nothing: ")
    assert rows[1.0]["learned"] is False and "learned" not in rows[3e-3]
    assert "pruned (learned nothing)" in format_table(report)
    assert report["best"]["params"]["train.lr"] == 3e-3
    trial = json.loads((tmp_path / "sw" / "trials" / str(rows[1.0]["number"]) / "trial.json").read_text())
    assert trial["state"] == "pruned" and "single class" in trial["reason"]


@pytest.mark.parametrize(("problem", "lr", "learned"), [("multi_label", 3e-3, True), ("multi_label", 1e-7, False),
                                                        ("regression", 3e-3, True), ("regression", 1e-7, False)])
def test_label_sets_and_numbers_are_judged_on_their_own_baselines(tiny_bert, multi_label_data, regression_data,
                                                                    tmp_path, problem, lr, learned):
    data = multi_label_data if problem == "multi_label" else regression_data
    raw = recipe_dict(tiny_bert, {"train": data, "validation": data, "test": data}, tmp_path / "run",
                      **{"head.problem": problem, "train.epochs": 6, "train.batch_size": 4, "train.lr": lr})
    found = run(raw)["health"]
    print(problem, lr, found)
    assert found["learned"] is learned, found
    if problem == "regression":
        assert found["baseline_loss"] == 1.0 and found["distinct_predictions"] is None
        assert learned or "predicting the training targets' mean" in found["reasons"][0]
    assert (log_of(raw).count(WARNING) == 1) is not learned
