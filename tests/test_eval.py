"""`finetune eval`: a run's metrics reproduced on its own test file (run folder, model folder, per-row output),
multi-label and regression, images, and bad input as one line."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from conftest import LABELS, call_main, recipe_dict, to_recipe, write_csv, write_recipe

from finetune.train import train


def read_metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


CONTINUOUS = {"loss", "mse", "rmse", "mae", "r2", "pearson", "spearman"}  # float rounding: batch shapes, folded scaling


def assert_reproduces(report: dict, expected: dict, tolerance: float = 1e-5) -> None:
    """Counting metrics exactly; losses and regression metrics to float rounding."""
    assert set(report) == set(expected)
    for name, value in expected.items():
        close = (
            pytest.approx(value, rel=tolerance, abs=tolerance) if name in CONTINUOUS
            else pytest.approx(value, abs=1e-12)
        )
        assert report[name] == close, name


@pytest.fixture(scope="module")
def cli_run(tiny_bert, tiny_data, tmp_path_factory):
    """A tiny run trained by `finetune run RECIPE` (the CLI's main, in this process: a subprocess would add a
    torch import for nothing; test_cli runs the real process)."""
    from finetune.cli import main

    root = tmp_path_factory.mktemp("eval-cli-run")
    recipe = write_recipe(root / "tiny.yaml", recipe_dict(tiny_bert, tiny_data, root / "run", **{"train.epochs": 3}))
    assert main(["run", str(recipe)]) == 0
    return root / "run"


def test_eval_on_the_runs_test_file_reproduces_metrics_json(cli_run, tiny_data, capfd):
    result = call_main(capfd, "eval", cli_run, "--data", tiny_data["test"], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    metrics = read_metrics(cli_run)
    assert_reproduces(report["metrics"], metrics["test"])
    assert report["rows"] == 9
    if "confusion" in metrics:  # the trainer writes it too: the same matrix
        assert report["confusion"]["matrix"] == metrics["confusion"]["matrix"]
    assert np.asarray(report["confusion"]["matrix"]).sum() == 9


@pytest.mark.parametrize("ema", [None, {"decay": 0.5}])
def test_a_run_without_a_test_split_keeps_its_best_validations_confusion_matrix(tiny_bert, tiny_data, tmp_path, capfd,
                                                                              ema):
    """With no test split, metrics.json's confusion matrix is the best evaluation's own (no second pass over the
    validation split): what `finetune eval` of the kept model on that split gives."""
    raw = recipe_dict(tiny_bert, tiny_data, tmp_path / "run", **{"train.epochs": 3, "data.test": None,
                                                                 "train.ema": ema})
    metrics = train(to_recipe(raw))
    assert "test" not in metrics and metrics["confusion"]["split"] == "validation"
    result = call_main(capfd, "eval", tmp_path / "run", "--data", tiny_data["validation"], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["confusion"]["matrix"] == metrics["confusion"]["matrix"]
    assert report["metrics"]["accuracy"] == pytest.approx(metrics["best"]["accuracy"], abs=1e-12)
    assert read_metrics(tmp_path / "run")["confusion"] == metrics["confusion"]


def test_eval_of_the_bare_model_folder_needs_only_the_column_names(cli_run, tiny_data, tmp_path, capfd):
    """No run recipe: columns from the options, truncation from the tokenizer (set to the run's max_length)."""
    shutil.copytree(cli_run / "model", tmp_path / "downloaded")  # a model folder outside any run folder
    argv = ["eval", tmp_path / "downloaded", "--data", tiny_data["test"], "--json"]
    result = call_main(capfd, *argv)
    assert result.returncode == 2 and "has no column 'text' (--text-column)" in result.stderr, result.stderr
    result = call_main(capfd, *argv, "--text-column", "sentence", "--label-column", "topic")
    assert result.returncode == 0, result.stderr
    assert_reproduces(json.loads(result.stdout)["metrics"], read_metrics(cli_run)["test"])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_output_writes_one_record_per_row_with_names_and_scores(cli_run, tiny_data, tmp_path, capfd, suffix):
    output = tmp_path / f"predictions{suffix}"
    result = call_main(capfd, "eval", cli_run, "--data", tiny_data["test"], "--output", output)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[0] == "loss"  # the table: metric, value
    if suffix == ".csv":
        with output.open(newline="") as f:
            records = list(csv.DictReader(f))
        correct = [r["correct"] == "True" for r in records]
    else:
        records = [json.loads(line) for line in output.read_text().splitlines()]
        correct = [r["correct"] for r in records]
    with tiny_data["test"].open(newline="") as f:
        source = list(csv.DictReader(f))
    assert [r["input"] for r in records] == [row["sentence"] for row in source]
    assert [r["label"] for r in records] == [row["topic"] for row in source]
    assert all(r["predicted"] in LABELS for r in records)
    for record in records:
        scores = [float(record[f"score:{label}"]) for label in LABELS]
        assert sum(scores) == pytest.approx(1.0, abs=1e-6)
        assert LABELS[int(np.argmax(scores))] == record["predicted"]
    assert np.mean(correct) == pytest.approx(read_metrics(cli_run)["test"]["accuracy"])


@pytest.fixture(scope="module")
def problem_runs(tiny_bert, multi_label_data, regression_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-problems")
    multi = {"train": multi_label_data, "validation": multi_label_data, "test": multi_label_data}
    regression = {"train": regression_data, "validation": regression_data, "test": regression_data}
    train(to_recipe(
        recipe_dict(tiny_bert, multi, root / "multi", **{"head.problem": "multi_label", "train.epochs": 4})
    ))
    train(to_recipe(recipe_dict(tiny_bert, regression, root / "regression", **{"head.problem": "regression"})))
    return {"multi": (root / "multi", multi_label_data), "regression": (root / "regression", regression_data)}


@pytest.mark.parametrize("problem", ["multi", "regression"])
def test_multi_label_and_regression_reproduce_their_test_metrics(problem_runs, problem, capfd, tmp_path):
    run, data = problem_runs[problem]
    output = tmp_path / "rows.jsonl"
    result = call_main(capfd, "eval", run, "--data", data, "--json", "--output", output)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert_reproduces(report["metrics"], read_metrics(run)["test"], tolerance=1e-4)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    if problem == "multi":
        assert set(report["per_label"]["labels"]) == set(LABELS) and len(report["per_label"]["f1"]) == 3
        assert all(set(r["label"].split("|")) <= set(LABELS) for r in records)
    else:
        assert all(r["error"] == pytest.approx(r["predicted"] - float(r["label"])) for r in records)


def test_image_folder_eval_reproduces_the_test_metrics(tmp_path, capfd):
    from PIL import Image

    rng = np.random.RandomState(1)
    images = tmp_path / "images"
    for split, count in (("train", 10), ("validation", 4), ("test", 4)):
        for channel, colour in ((0, "red"), (2, "blue")):
            (images / split / colour).mkdir(parents=True)
            for i in range(count):
                pixels = rng.randint(0, 90, (16, 16, 3))
                pixels[..., channel] = rng.randint(170, 256, (16, 16))
                Image.fromarray(pixels.astype(np.uint8)).save(images / split / colour / f"{i}.png")
    raw = {
        "task": "image-classification",
        "backbone": {"name": "test_efficientnet", "pretrained": False, "dropout": 0.0},
        "data": {**{k: str(images / k) for k in ("train", "validation", "test")}, "image_size": 32, "num_workers": 0},
        "augment": {"scale": [1.0, 1.0], "hflip": 0.0},
        "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup": 0, "scheduler": "constant", "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
    }
    train(to_recipe(raw))
    result = call_main(capfd, "eval", tmp_path / "run", "--data", images / "test", "--json")
    assert result.returncode == 0, result.stderr
    assert_reproduces(json.loads(result.stdout)["metrics"], read_metrics(tmp_path / "run")["test"])
    # the parent folder holds train/validation/test: --split picks one
    result = call_main(capfd, "eval", tmp_path / "run", "--data", images, "--split", "test", "--json")
    assert result.returncode == 0, result.stderr
    assert_reproduces(json.loads(result.stdout)["metrics"], read_metrics(tmp_path / "run")["test"])


def test_bad_input_is_one_line_naming_the_culprit(cli_run, tiny_data, tmp_path, capfd):
    unseen = write_csv(tmp_path / "unseen.csv", ["sentence", "topic"], [["the bread", "food"], ["a robot", "weather"]])
    cases = [
        (["--data", unseen], "unseen.csv' line 3: label 'weather'"),
        (["--data", tiny_data["test"], "--label-column", "topik"], "did you mean --label-column topic"),
        (["--data", tiny_data["test"], "--output", tmp_path / "x.txt"], "--output"),
        (["--data", tmp_path / "missing.csv"], "missing.csv' not found"),
    ]
    for options, culprit in cases:
        result = call_main(capfd, "eval", cli_run, *options)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and culprit in result.stderr, result.stderr
