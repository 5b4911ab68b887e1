"""The model card: hub metadata that huggingface_hub parses, the data and results sections against the run's own
files, the embedded plots, and the usage snippet executed as written in a fresh process."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import LABELS, recipe_dict, subprocess_env, to_recipe

from finetune.model_folder import base_model, for_hub
from finetune.train import train


def snippet_of(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def start_snippet(card: str, cwd: Path) -> subprocess.Popen:
    """Run the card's snippet exactly as written, in a fresh interpreter."""
    return subprocess.Popen(
        [sys.executable, "-c", snippet_of(card)], cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def text_run(tiny_bert, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "topics"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **{"train.epochs": 3})))
    return out


def test_the_header_is_hub_metadata_with_the_test_metrics(text_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(text_run / "model" / "README.md")  # what the hub does with it
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-classification"
    assert "finetune" in data["tags"] and "base_model" not in data  # a local folder has no hub id
    test = json.loads((text_run / "metrics.json").read_text())["test"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {name: round(value, 4) for name, value in test.items() if name != "loss"}
    assert all(r.dataset_split == "test" and r.dataset_name == "test.csv" for r in card.data.eval_results)


def test_the_body_describes_labels_data_results_and_limits(text_run, tiny_data):
    card = (text_run / "model" / "README.md").read_text()
    for heading in ("## Use", "## Training data", "## Results", "## Intended use and limits", "## Recipe"):
        assert heading in card
    assert "Labels (3): `food`, `sports`, `tech`." in card
    assert f"| train | `{tiny_data['train']}` | 16 | 6 | 5 | 5 |" in card  # rows per split and per class
    assert f"| test | `{tiny_data['test']}` | 9 | 3 | 3 | 3 |" in card
    assert "Texts are cut to 16 tokens" in card
    recipe = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe == yaml.safe_load((text_run / "config.yaml").read_text())


def test_the_confusion_matrix_and_plots_are_in_the_card_and_the_folder(text_run):
    card = (text_run / "model" / "README.md").read_text()
    metrics = json.loads((text_run / "metrics.json").read_text())
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert "plots/loss.png" in images
    for image in images:  # every embedded picture is in the model folder (it travels to the hub) and the run's
        assert (text_run / "model" / image).is_file() and (text_run / image).is_file()
    if "confusion" in metrics:  # written by the trainer
        assert "plots/confusion.png" in images
        for label, row in zip(LABELS, metrics["confusion"]["matrix"]):
            assert f"| **{label}** | " + " | ".join(map(str, row)) + " |" in card


def test_the_usage_snippet_runs_as_written(text_run, tmp_path):
    card = (text_run / "model" / "README.md").read_text()
    assert f'MODEL = "{(text_run / "model").as_posix()}"' in card
    printed = ast.literal_eval(finish(start_snippet(card, tmp_path)).strip())
    assert {item["label"] for item in printed[0]} == set(LABELS)
    assert sum(item["score"] for item in printed[0]) == pytest.approx(1.0, abs=1e-4)


def test_for_hub_points_the_snippet_at_the_repo():
    text = 'x\nMODEL = "runs/a/model"\ny = 1\n'
    assert for_hub(text, "me/a") == 'x\nMODEL = "me/a"\ny = 1\n'
    assert for_hub('MODEL = "local-dir:runs/b/model"\n', "me/b") == 'MODEL = "hf-hub:me/b"\n'


@pytest.mark.parametrize(
    "task, name, pretrained, expected",
    [
        ("text-classification", "minilm-l6", True, "sentence-transformers/all-MiniLM-L6-v2"),
        ("text-classification", "bert-base-uncased", True, "bert-base-uncased"),
        ("text-classification", "minilm-l6", False, None),  # random init: no parent model
        ("image-classification", "efficientnet-lite0", True, "timm/tf_efficientnet_lite0.in1k"),
        ("image-classification", "resnet50.a1_in1k", True, "timm/resnet50.a1_in1k"),
        ("image-classification", "hf-hub:me/vit", True, "me/vit"),
        ("image-classification", "local-dir:/tmp/x", True, None),
    ],
)
def test_base_model_names_the_pretrained_parent(task, name, pretrained, expected):
    from finetune.recipe import from_dict

    recipe = from_dict({"task": task, "backbone": {"name": name, "pretrained": pretrained}, "data": {"train": "x.csv"}})
    assert base_model(recipe) == expected


# ---------------------------------------------------------------------------------------------------------------
# The other card kinds: kit format, regression, timm (slower: a fresh interpreter each, run side by side)


@pytest.mark.slow
def test_kit_regression_and_timm_snippets_run_as_written(tiny_bert, tiny_data, regression_data, tmp_path):
    import numpy as np
    from PIL import Image

    regression = {"train": regression_data, "validation": regression_data, "test": regression_data}
    runs = {
        "kit": recipe_dict(tiny_bert, tiny_data, tmp_path / "kit", **{"head.type": "mlp", "head.hidden": [8]}),
        "regression": recipe_dict(tiny_bert, regression, tmp_path / "regression", **{"head.problem": "regression"}),
    }
    rng = np.random.RandomState(0)
    for split in ("train", "validation", "test"):
        for channel, colour in ((0, "red"), (2, "blue")):
            (tmp_path / "images" / split / colour).mkdir(parents=True)
            for i in range(4):
                pixels = rng.randint(0, 90, (16, 16, 3))
                pixels[..., channel] = 220
                Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "images" / split / colour / f"{i}.png")
    runs["timm"] = {
        "task": "image-classification",
        "backbone": {"name": "test_efficientnet", "pretrained": False},
        "data": {**{k: str(tmp_path / "images" / k) for k in ("train", "validation", "test")}, "image_size": 32,
                 "num_workers": 0},
        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "timm")},
    }
    for raw in runs.values():
        train(to_recipe(raw))
    cards = {name: (tmp_path / name / "model" / "README.md").read_text() for name in runs}
    assert "library_name: finetune" in cards["kit"] and "finetune.load(MODEL)" in cards["kit"]
    assert "library_name: timm" in cards["timm"] and 'MODEL = "local-dir:' in cards["timm"]
    started = {name: start_snippet(card, tmp_path) for name, card in cards.items()}
    printed = {name: finish(process).strip() for name, process in started.items()}
    kit = ast.literal_eval(printed["kit"])
    assert kit[0]["label"] in LABELS and len(kit[0]["scores"]) == 3
    value = ast.literal_eval(printed["regression"])[0][0]
    assert value["label"] == "value" and 80 < value["score"] < 120  # the pipeline's score is the number itself
    scores = ast.literal_eval(printed["timm"])
    assert set(scores) == {"blue", "red"} and sum(scores.values()) == pytest.approx(1.0, abs=1e-3)
