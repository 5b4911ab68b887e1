"""Calibrated scores and confidence sets: the ECE/NLL math, the fitted temperature, a run's folded export (labels
bit for bit, probabilities equal to the kit's own), a multi-label threshold moved with the logits, LoRA, cached
features and resume, and split-conformal coverage on held-out rows."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FILLERS, KEYWORDS, LABELS, call_main, recipe_dict, to_recipe, write_csv
from safetensors.torch import load_file

import finetune
from finetune import calibration
from finetune.errors import FinetuneError
from finetune.problems import IGNORE_INDEX, get
from finetune.train import train

CLASSIFIER = "classifier.weight"


def noisy_rows(per_label: int, seed: int, noise: float = 0.1) -> list[tuple[str, str]]:
    """Keyword texts whose label is another class for a `noise` share of rows: a model that fits them becomes
    over-confident, and no split is ever answered perfectly (a temperature then has something to fit)."""
    rng = random.Random(seed)
    rows = []
    for i in range(per_label):
        for label in LABELS:
            words = rng.sample(FILLERS, 3)
            words.insert(rng.randrange(4), rng.choice(KEYWORDS[label]))
            given = rng.choice([x for x in LABELS if x != label]) if rng.random() < noise else label
            rows.append((" ".join(words), given))
    return rows


@pytest.fixture(scope="module")
def noisy_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("noisy")
    header = ["sentence", "topic"]
    return {split: write_csv(root / f"{split}.csv", header, noisy_rows(n, seed))
            for split, n, seed in (("train", 40, 0), ("validation", 30, 1), ("test", 30, 2))}


SETTINGS = {"train.epochs": 8, "train.lr": 3e-3}
CHECKPOINTS = {"train.checkpoint_every": 30, "train.keep_checkpoints": 10}  # for the resume test


@pytest.fixture(scope="module")
def runs(tiny_bert, noisy_data, tmp_path_factory) -> dict[str, Path]:
    """The same run (same seed) calibrated, and with eval.calibrate: null."""
    root = tmp_path_factory.mktemp("calibration-runs")
    out = {"calibrated": root / "calibrated", "raw": root / "raw"}
    train(to_recipe(recipe_dict(tiny_bert, noisy_data, out["calibrated"], **SETTINGS | CHECKPOINTS)))
    train(to_recipe(recipe_dict(tiny_bert, noisy_data, out["raw"], **SETTINGS | {"eval.calibrate": None})))
    return out


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_ece_and_nll_against_a_hand_computation():
    # bins of width 1/15: 0.95 and 0.99 share the top bin, 0.5 and 0.52 share (7/15, 8/15], 0.2 is alone
    confidence = np.array([0.95, 0.99, 0.5, 0.52, 0.2])
    correct = np.array([1, 0, 1, 1, 0])
    by_hand = (2 * abs(0.5 - 0.97) + 2 * abs(1.0 - 0.51) + 1 * abs(0.0 - 0.2)) / 5
    assert calibration.expected_calibration_error(confidence, correct) == pytest.approx(by_hand, abs=1e-12)
    bins = calibration.reliability_bins(confidence, correct)
    assert bins["count"][14] == 2 and bins["count"][7] == 2 and bins["count"][2] == 1 and sum(bins["count"]) == 5
    assert bins["accuracy"][14] == pytest.approx(0.5) and bins["confidence"][7] == pytest.approx(0.51)

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    scored = calibration.scores_at(get("single_label"), logits, labels, 2.0)
    nll = -(math.log(math.exp(1.0) / (math.exp(1.0) + 1 + math.exp(-0.5)))
            + math.log(1 / (math.exp(0.25) + math.exp(0.75) + 1))) / 2
    assert scored["nll"] == pytest.approx(nll, rel=1e-6)
    top = [math.exp(1.0) / (math.exp(1.0) + 1 + math.exp(-0.5)), math.exp(0.75) / (math.exp(0.25) + math.exp(0.75) + 1)]
    assert scored["ece"] == pytest.approx((abs(1 - top[0]) + abs(0 - top[1])) / 2, rel=1e-6)  # two bins of one row


def synthetic(problem: str, rows: int, seed: int):
    """(true logits, labels drawn from their scores) for a problem: the true logits are calibrated by construction."""
    rng = np.random.default_rng(seed)
    if problem == "multi_label":
        logits = rng.normal(0, 2, (rows, 4))
        labels = (rng.random((rows, 4)) < 1 / (1 + np.exp(-logits))).astype(np.float32)
        return torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)
    logits = rng.normal(0, 1.5, (rows, 5))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = (rng.random((rows, 1)) > p.cumsum(-1)).sum(-1)  # one draw from each row's scores
    if problem == "tags":  # sentences of 8 tokens, a quarter of the positions ignored
        labels = np.where(rng.random(rows) < 0.25, IGNORE_INDEX, labels)
        return torch.tensor(logits, dtype=torch.float32).view(-1, 8, 5), torch.tensor(labels).view(-1, 8)
    return torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)


@pytest.mark.parametrize("problem", ["single_label", "multi_label", "tags"])
def test_the_fitted_temperature_recovers_an_over_confident_model(problem):
    solver = get(problem)
    logits, labels = solver.calibration_rows(*synthetic(problem, 8000, seed=3))
    over_confident = 2.5 * logits  # what fitting a noisy training set does to a model's logits
    temperature = calibration.fit_temperature(solver, over_confident, labels)
    assert temperature == pytest.approx(2.5, rel=0.06)
    before = calibration.scores_at(solver, over_confident, labels, 1.0)
    after = calibration.scores_at(solver, over_confident, labels, temperature)
    assert after["nll"] < before["nll"] - 0.05 and after["ece"] < before["ece"] / 3


def test_a_calibrated_run_keeps_every_label_and_exports_the_scores_it_fitted(runs, noisy_data):
    record = read_metrics(runs["calibrated"])["calibration"]
    temperature = record["temperature"]
    assert record["method"] == "temperature" and temperature > 1.5  # the noisy labels made the model over-confident
    for split in ("validation", "test"):
        assert record[split]["nll"] < record["before"][split]["nll"]
        assert record[split]["ece"] < record["before"][split]["ece"] / 2
    raw_record = read_metrics(runs["raw"])["calibration"]
    assert raw_record["method"] is None and raw_record["temperature"] == 1.0
    assert raw_record["test"] == record["before"]["test"]  # the same kept model, scored at T = 1

    # the fold: the raw run's last layer divided by T, every other weight bit for bit the same
    calibrated, raw = (load_file(runs[k] / "model" / "model.safetensors") for k in ("calibrated", "raw"))
    assert sorted(calibrated) == sorted(raw)
    for name in raw:
        expected = raw[name] / temperature if name.startswith("classifier.") else raw[name]
        assert torch.equal(calibrated[name], expected), name

    texts = [row[0] for row in noisy_rows(30, 2)]
    with torch.no_grad():
        got = finetune.load(runs["calibrated"]).predict(texts)
        reference = finetune.load(runs["raw"]).logits(texts)
    assert [r["label"] for r in got] == [LABELS[i] for i in reference.argmax(-1)]  # predicted labels bit for bit
    expected = torch.softmax(torch.tensor(reference) / temperature, -1).numpy()
    scores = np.array([[{s["label"]: s["score"] for s in r["scores"]}[name] for name in LABELS] for r in got])
    np.testing.assert_allclose(scores, expected, atol=1e-5)  # what the kit computed is what any loader computes
    truth = [row[1] for row in noisy_rows(30, 2)]
    nll = -np.mean([math.log(row[LABELS.index(t)]) for row, t in zip(scores, truth)])
    assert nll == pytest.approx(record["test"]["nll"], rel=1e-4)


def test_a_calibrated_run_says_so_in_its_log_card_plot_and_model_folder(runs):
    run = runs["calibrated"]
    record = read_metrics(run)["calibration"]
    log = (run / "train.log").read_text()
    assert f"calibrated: temperature {record['temperature']:.4g} fitted on validation" in log
    card = (run / "model" / "README.md").read_text()
    assert f"test ECE {record['test']['ece']:.4f}" in card and "![Reliability" in card
    for folder in (run / "plots", run / "model" / "plots"):
        assert (folder / "reliability.png").stat().st_size > 1000
    kept = json.loads((run / "model" / calibration.CALIBRATION_FILE).read_text())
    assert kept["temperature"] == record["temperature"] and len(kept["conformal"]["validation_scores"]) == 90
    assert "not calibrated (eval.calibrate: null)" in (runs["raw"] / "train.log").read_text()


def test_a_resumed_run_calibrates_as_the_uninterrupted_one(runs, tiny_bert, noisy_data, tmp_path):
    out = tmp_path / "run"
    raw = recipe_dict(tiny_bert, noisy_data, out, **SETTINGS | CHECKPOINTS)
    shutil.copytree(runs["calibrated"], out)
    for later in sorted((out / "checkpoints").glob("step-*"))[1:]:  # what a kill after the first checkpoint leaves
        shutil.rmtree(later)
    for name in ("model", "metrics.json", calibration.CALIBRATION_FILE):
        subprocess.run(["rm", "-rf", str(out / name)], check=True)
    (out / "config.yaml").write_text((runs["calibrated"] / "config.yaml").read_text().replace(
        str(runs["calibrated"]), str(out)))
    train(to_recipe(raw), resume=True)
    assert "resumed from" in (out / "train.log").read_text()
    assert read_metrics(out)["calibration"] == read_metrics(runs["calibrated"])["calibration"]
    resumed, whole = (load_file(d / "model" / "model.safetensors") for d in (out, runs["calibrated"]))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


@pytest.mark.parametrize("settings", [pytest.param({"lora": {"r": 4}, "train.lr": 1e-2}, marks=pytest.mark.slow),
                                      {"train.freeze": "backbone"}], ids=["lora", "cached-features"])
def test_lora_and_cached_features_fold_the_temperature_into_the_exported_head(tiny_bert, noisy_data, tmp_path,
                                                                             settings):
    weights, records = {}, {}
    for name, calibrate in (("calibrated", "temperature"), ("raw", None)):
        out = tmp_path / name
        base = {"train.epochs": 1, "train.lr": 3e-3, "eval.calibrate": calibrate}
        train(to_recipe(recipe_dict(tiny_bert, noisy_data, out, **base | settings)))
        weights[name] = load_file(out / "model" / "model.safetensors")
        records[name] = read_metrics(out)["calibration"]
    temperature = records["calibrated"]["temperature"]
    assert temperature != 1.0 and records["raw"]["temperature"] == 1.0
    if "train.freeze" in settings:
        assert "cached features" in (tmp_path / "calibrated" / "train.log").read_text()
    for name in weights["raw"]:  # the merged (LoRA) or whole (cached-feature) model: its head divided by T
        expected = weights["raw"][name] / temperature if name.startswith("classifier.") else weights["raw"][name]
        torch.testing.assert_close(weights["calibrated"][name], expected, rtol=0, atol=0, msg=name)


def test_a_multi_label_threshold_moves_with_the_logits(tiny_bert, multi_label_data, tmp_path):
    texts = [line.split(",")[0] for line in multi_label_data.read_text().splitlines()[1:]]
    predicted, records = {}, {}
    for name, calibrate in (("calibrated", "temperature"), ("raw", None)):
        out = tmp_path / name
        raw = recipe_dict(tiny_bert, {"train": multi_label_data, "validation": None, "test": None}, out, **{
            "head.problem": "multi_label", "head.threshold": 0.3, "train.epochs": 3, "train.lr": 3e-3,
            "eval.calibrate": calibrate, "data.val_fraction": 0.25})
        del raw["data"]["validation"], raw["data"]["test"]  # validation: a quarter of train, held out
        train(to_recipe(raw))
        records[name] = read_metrics(out)["calibration"]
        model = finetune.load(out)
        predicted[name] = [r["labels"] for r in model.predict(texts)]
        predicted[name + " threshold"] = model.threshold
    temperature = records["calibrated"]["temperature"]
    assert temperature != 1.0
    moved = 1 / (1 + math.exp(-math.log(0.3 / 0.7) / temperature))
    assert records["calibrated"]["threshold"] == {"before": 0.3, "after": pytest.approx(moved)}
    assert predicted["calibrated threshold"] == pytest.approx(moved) and predicted["raw threshold"] == 0.3
    assert predicted["calibrated"] == predicted["raw"]  # the same label sets, row by row
    card = (tmp_path / "calibrated" / "model" / "README.md").read_text()
    assert f"exceeds {moved}" in card


def test_split_conformal_sets_cover_held_out_rows_at_the_asked_level(tmp_path):
    """Seeded synthetic model (5 labels, scores calibrated by construction but sharp): 2,000 validation rows make
    calibration.json, 20,000 held-out rows measure coverage (its standard error is under 0.3 points)."""
    solver = get("single_label")
    labels = ["a", "b", "c", "d", "e"]
    validation, held_out = synthetic("single_label", 2000, seed=5), synthetic("single_label", 20000, seed=6)
    scores = solver.conformal_scores(solver.probabilities(validation[0].numpy()), validation[1].numpy())
    (tmp_path / calibration.CALIBRATION_FILE).write_text(json.dumps(
        {"method": None, "temperature": 1.0, "conformal": {"validation_scores": sorted(scores.tolist())}}))
    decoded = solver.decode(held_out[0].numpy(), labels)
    truth = [labels[i] for i in held_out[1].tolist()]
    for level in (0.8, 0.9, 0.95):
        cutoff = calibration.set_cutoff(tmp_path, "single_label", level, "--confidence-set")
        sets = [solver.confidence_set(result, cutoff) for result in decoded]
        coverage = np.mean([t in s for t, s in zip(truth, sets)])
        assert abs(coverage - level) < 0.03, (level, coverage)
        assert np.mean([len(s) for s in sets]) < len(labels)  # smaller than "every label"
    assert calibration.conformal_cutoff([0.1, 0.2, 0.3], 0.9) == 0.0  # 3 rows cannot promise 90%: every label


def test_predict_and_serve_give_confidence_sets(runs, capfd):
    from fastapi.testclient import TestClient

    from finetune.serve import build_app

    texts = ["the bread today", "a goal of news", "very robot story code"]
    done = call_main(capfd, "predict", runs["calibrated"], *texts, "--confidence-set", "0.9", "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 3 and all(set(line["confidence_set"]) <= set(LABELS) for line in lines)
    cutoff = finetune.load(runs["calibrated"]).confidence_cutoff(0.9)
    for line in lines:
        assert line["confidence_set"] == [s["label"] for s in line["scores"] if s["score"] >= cutoff]
    with TestClient(build_app(finetune.load(runs["calibrated"]))) as client:
        answer = client.post("/predict", json={"inputs": texts, "confidence_set": 0.9, "top_k": 1}).json()
        assert [p["confidence_set"] for p in answer["predictions"]] == [line["confidence_set"] for line in lines]
        assert all(len(p["scores"]) == 1 for p in answer["predictions"])
        bad = client.post("/predict", json={"inputs": texts, "confidence_set": 1.5})
        assert bad.status_code == 400 and "confidence_set" in bad.json()["error"]


def test_bad_confidence_set_requests_are_one_line(runs, tmp_path, capfd):
    done = call_main(capfd, "predict", runs["calibrated"], "soup", "--confidence-set", "1.5")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--confidence-set: must be" in done.stderr
    bare = tmp_path / "model"
    shutil.copytree(runs["calibrated"] / "model", bare)
    (bare / calibration.CALIBRATION_FILE).unlink()
    done = call_main(capfd, "predict", bare, "soup", "--confidence-set", "0.9")
    assert done.returncode == 2 and "has no calibration.json" in done.stderr and done.stderr.strip().count("\n") == 0
    with pytest.raises(FinetuneError, match="multi-label model decides each label on its own"):
        calibration.set_cutoff(tmp_path, "multi_label", 0.9, "confidence_set")
    with pytest.raises(FinetuneError, match="regression model predicts a number"):
        calibration.set_cutoff(tmp_path, "regression", 0.9, "confidence_set")
