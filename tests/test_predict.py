"""Prediction: `finetune.load(...).predict(...)` and `finetune predict` on texts, files and images, for every
problem type and both export formats, against what the loaded model computes by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import LABELS, call_main, one_error_line, recipe_dict, run_cli, to_recipe, write_csv
from PIL import Image

import finetune
from finetune.train import train

TEXTS = ["the bread today", "a goal of news", "very robot story code", "salad and soup"]


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_data, multi_label_data, regression_data, tmp_path_factory):
    """Three tiny runs: single-label (native transformers), multi-label (kit format: mlp head) and regression."""
    root = tmp_path_factory.mktemp("predict-runs")
    only_train = {"train": multi_label_data, "validation": multi_label_data, "test": multi_label_data}
    regression = {"train": regression_data, "validation": regression_data, "test": regression_data}
    recipes = {
        "single": recipe_dict(tiny_bert, tiny_data, root / "single", **{"train.epochs": 4}),
        "multi": recipe_dict(
            tiny_bert, only_train, root / "multi",
            **{"head.problem": "multi_label", "head.type": "mlp", "head.hidden": [16], "train.epochs": 4},
        ),
        "regression": recipe_dict(tiny_bert, regression, root / "regression", **{"head.problem": "regression"}),
    }
    for raw in recipes.values():
        train(to_recipe(raw))
    return {name: root / name for name in recipes}


@torch.no_grad()
def logits_by_hand(model_dir, texts) -> np.ndarray:
    from finetune.loading import load_model_folder

    model, tokenizer, _ = load_model_folder(model_dir)
    output = model(**tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt"))
    return (output.logits if hasattr(output, "logits") else output).float().numpy()


# ---------------------------------------------------------------------------------------------------------------
# The Python API


def test_load_gives_a_predictor_that_also_unpacks(runs):
    predictor = finetune.load(runs["single"])
    assert predictor.labels == LABELS and predictor.problem == "single_label" and predictor.max_length == 16
    model, tokenizer, spec = finetune.load(runs["single"] / "model")  # the tuple form keeps working
    assert spec["labels"] == LABELS and not model.training and tokenizer.model_max_length == 16


def test_single_label_predictions_are_the_softmax_of_the_model(runs):
    predictor = finetune.load(runs["single"])
    results = predictor.predict(TEXTS)
    logits = logits_by_hand(runs["single"] / "model", TEXTS)
    probabilities = torch.softmax(torch.from_numpy(logits), -1).numpy()
    for result, row in zip(results, probabilities):
        assert result["label"] == LABELS[row.argmax()]
        assert result["score"] == pytest.approx(row.max(), abs=1e-5)
        assert [item["label"] for item in result["scores"]] == [LABELS[j] for j in np.argsort(-row)]
        assert sum(item["score"] for item in result["scores"]) == pytest.approx(1.0, abs=1e-6)
    single = predictor.predict(TEXTS[0])  # one text in, one dict out (unpadded: equal to float rounding)
    assert single["label"] == results[0]["label"] and single["score"] == pytest.approx(results[0]["score"], abs=1e-6)
    assert [len(r["scores"]) for r in predictor.predict(TEXTS, top_k=2)] == [2] * len(TEXTS)


def test_batching_and_length_sorting_do_not_change_results(runs):
    predictor = finetune.load(runs["single"])
    texts = TEXTS + ["bread", "the ball of the match and the team today very news"]
    one_batch = predictor.logits(texts, batch_size=64)
    small_batches = predictor.logits(texts, batch_size=2)
    assert np.allclose(one_batch, small_batches, atol=1e-5)
    assert np.allclose(one_batch[: len(TEXTS)], logits_by_hand(runs["single"] / "model", TEXTS), atol=1e-5)


def test_long_inputs_show_a_progress_bar(runs, capfd):
    predictor = finetune.load(runs["single"])
    capfd.readouterr()
    predictor.predict(TEXTS * 3, batch_size=2, progress=True)
    assert "predict" in capfd.readouterr().err  # tqdm's bar, on stderr
    predictor.predict(TEXTS * 3, batch_size=2)  # not a terminal: no bar unless asked
    assert capfd.readouterr().err == ""


def test_multi_label_kit_format_gives_the_labels_over_the_threshold(runs):
    predictor = finetune.load(runs["multi"])
    assert (runs["multi"] / "model" / "finetune.json").is_file()  # the mlp head: finetune's own format
    logits = logits_by_hand(runs["multi"] / "model", TEXTS)
    for result, row in zip(predictor.predict(TEXTS), 1 / (1 + np.exp(-logits))):
        assert result["labels"] == [LABELS[j] for j in np.argsort(-row) if row[j] > 0.5]
        assert {item["label"]: item["score"] for item in result["scores"]} == pytest.approx(
            dict(zip(LABELS, row)), abs=1e-5
        )


def test_regression_predicts_in_the_targets_units(runs):
    predictor = finetune.load(runs["regression"])
    values = [result["value"] for result in predictor.predict(TEXTS)]
    assert np.allclose(values, logits_by_hand(runs["regression"] / "model", TEXTS).reshape(-1), atol=1e-4)
    assert all(80 < value < 120 for value in values)  # targets are 95, 100 and 105: not standardised numbers


# ---------------------------------------------------------------------------------------------------------------
# The command line


def test_cli_predicts_texts_a_text_file_and_a_csv_column(runs, tiny_data, tmp_path, capfd):
    lines = tmp_path / "lines.txt"
    lines.write_text("the bread today\n\na goal of news\n")
    result = call_main(
        capfd, "predict", runs["single"], "salad and soup", lines, tiny_data["test"], "--column", "sentence", "--json"
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # JSON Lines
    assert [row["input"] for row in rows[:3]] == ["salad and soup", "the bread today", "a goal of news"]
    assert len(rows) == 3 + 9  # one text, two lines (the blank one skipped), nine rows of the test file
    expected = finetune.load(runs["single"]).predict([row["input"] for row in rows])
    assert [row["label"] for row in rows] == [e["label"] for e in expected]


def test_cli_table_shows_top_k_and_regression_numbers(runs, capfd):
    result = call_main(capfd, "predict", runs["single"] / "model", *TEXTS[:2], "--top-k", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("the bread today")
    assert sum(label in lines[0] for label in LABELS) == 2
    result = call_main(capfd, "predict", runs["regression"], TEXTS[0])
    value = float(result.stdout.split()[-1])
    assert value == pytest.approx(finetune.load(runs["regression"]).predict(TEXTS[0])["value"], rel=1e-5)


def test_cli_multi_label_lists_labels_over_the_threshold(runs, capfd):
    result = call_main(capfd, "predict", runs["multi"], *TEXTS, "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # JSON Lines
    table = call_main(capfd, "predict", runs["multi"], *TEXTS).stdout.strip().splitlines()
    for row, line in zip(rows, table):
        shown = line[60:].split()
        if row["labels"]:
            assert shown[::2] == row["labels"]
        else:
            assert "no label over the threshold" in line


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["predict", "no/such/folder/anywhere", "text"], "no/such/folder/anywhere"),
        (["predict", "{run}", "{csv}", "--column", "sentense"], "did you mean --column=sentence"),
        (["predict", "{run}", "text", "--top-k", "0"], "--top-k"),
        (["predict", "{data_dir}", "text"], "not a run folder"),
    ],
)
def test_cli_bad_input_is_one_line(runs, tiny_data, capfd, argv, culprit):
    argv = [a.format(run=runs["single"], csv=tiny_data["test"], data_dir=tiny_data["test"].parent) for a in argv]
    result = call_main(capfd, *argv)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and culprit in result.stderr, result.stderr


def test_cli_text_model_given_an_image_file_says_so_and_a_missing_one_is_text(runs, tmp_path, capfd, monkeypatch):
    """The cheat sheet's `predict runs/my "great phone" img.png` on a text model: an image that exists is a mistake
    (one line naming it); "img.png" when no such file exists is a text, as any other word."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    result = call_main(capfd, "predict", runs["single"], "great phone", "img.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "img.png: an image file, but this is a text model" in one_error_line(result)
    result = call_main(capfd, "predict", runs["single"], "great phone", tmp_path)  # a folder: same
    assert result.returncode == 2 and "a folder, but this is a text model" in result.stderr
    (tmp_path / "img.png").unlink()
    result = call_main(capfd, "predict", runs["single"], "great phone", "img.png", "--json")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == ["great phone", "img.png"]


@pytest.mark.slow
def test_a_real_process_prints_predictions(runs):
    result = run_cli("predict", runs["single"], *TEXTS[:2])
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.strip().splitlines()) == 2
    assert one_error_line(run_cli("predict", runs["single"] / "missing", "x")).startswith("finetune: error:")


# ---------------------------------------------------------------------------------------------------------------
# Images: a tiny timm CNN, native and kit format


COLOURS = ["blue", "red"]


def colour_image(colour: str, rng: np.random.RandomState) -> Image.Image:
    pixels = rng.randint(0, 90, (20, 20, 3))
    pixels[..., {"red": 0, "blue": 2}[colour]] = rng.randint(170, 256, (20, 20))
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A random-init timm test CNN trained to tell mostly-red from mostly-blue 20x20 images."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.RandomState(0)
    for split, count in (("train", 12), ("validation", 4), ("test", 4)):
        for colour in COLOURS:
            (root / split / colour).mkdir(parents=True)
            for i in range(count):
                colour_image(colour, rng).save(root / split / colour / f"{i}.png")
    raw = {
        "task": "image-classification",
        "backbone": {"name": "test_efficientnet", "pretrained": False, "dropout": 0.0},
        "head": {"type": "linear", "dropout": 0.0},
        "data": {**{k: str(root / k) for k in ("train", "validation", "test")}, "image_size": 32, "num_workers": 0},
        "augment": {"scale": [1.0, 1.0], "hflip": 0.0},
        "train": {
            "epochs": 3, "batch_size": 8, "lr": 3e-3, "warmup": 0, "scheduler": "constant", "precision": "fp32",
            "seed": 0,
        },
        "output": {"dir": str(root / "run")},
    }
    train(to_recipe(raw))
    return root


def test_images_files_a_folder_and_a_csv_of_paths(image_run, tmp_path, capfd):
    run, test = image_run / "run", image_run / "test"
    files = sorted(str(p) for p in test.rglob("*.png"))
    table = write_csv(tmp_path / "images.csv", ["path"], [[p] for p in files[:3]])
    result = call_main(capfd, "predict", run, files[0], test / "red", table, "--column", "path", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # JSON Lines
    assert len(rows) == 1 + 4 + 3
    assert rows[1]["input"].endswith("red/0.png")  # a folder: its images, sorted
    predictor = finetune.load(run)
    assert predictor.task == "image-classification" and predictor.labels == COLOURS
    direct = predictor.predict([Image.open(files[0])])[0]  # a PIL image works as well as a path
    assert direct["label"] == rows[0]["label"] and direct["score"] == pytest.approx(rows[0]["score"], abs=1e-5)


def test_image_predictions_match_the_timm_model_by_hand(image_run):
    model, transform, _ = finetune.load(image_run / "run" / "model")
    files = sorted((image_run / "test").rglob("*.png"))
    with torch.no_grad():
        logits = model(pixel_values=torch.stack([transform(Image.open(f).convert("RGB")) for f in files])).numpy()
    assert np.allclose(finetune.load(image_run / "run").logits(files, batch_size=3), logits, atol=1e-5)


def test_a_bad_image_is_one_line_naming_it(image_run, tmp_path, capfd):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    result = call_main(capfd, "predict", image_run / "run", broken)
    assert result.returncode == 2 and str(broken) in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = call_main(capfd, "predict", image_run / "run", "just some words")
    assert result.returncode == 2 and "no such image file or folder" in result.stderr
