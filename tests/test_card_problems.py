"""The model card says what the model really outputs, for every task x problem the kit supports: its sentence ("it
sorts / tags / predicts ...") and its usage lines (what the snippet prints and what the note after it says). The
cards are built from the real splits of small data sets, without training (the card reads the recipe and splits)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import LABELS, to_recipe
from test_images import save_image
from test_pairs import pair_data  # noqa: F401  (fixture)
from test_token_classification import corpus, write

from finetune.model_folder import model_card
from finetune.model import is_native
from finetune.tasks import TASKS, get_task

# task, problem, variant: every pair TASKS offers must be here (a new task or problem adds its rows)
CASES = [
    ("text-classification", "single_label", "texts"),
    ("text-classification", "single_label", "pairs"),
    ("text-classification", "single_label", "kit head"),
    ("text-classification", "multi_label", "texts"),
    ("text-classification", "multi_label", "kit head"),
    ("text-classification", "regression", "texts"),
    ("text-classification", "regression", "kit head"),
    ("token-classification", "tags", "words"),
    ("image-classification", "single_label", "images"),
    ("image-classification", "multi_label", "images"),
    ("image-classification", "regression", "images"),
]


def test_every_task_and_problem_has_a_card_case():
    offered = {(task, problem) for task in TASKS for problem in get_task(task).problems}
    assert offered == {(task, problem) for task, problem, _ in CASES}


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> dict[str, Path]:
    """One table of texts with a class, a label set and a number per row (train and test)."""
    root = tmp_path_factory.mktemp("card-texts")
    files = {}
    for key, count in (("train", 24), ("test", 6)):
        rows = [{"sentence": f"{LABELS[i % 3]} row {i}", "topic": LABELS[i % 3],
                 "topics": "|".join(LABELS[: 1 + i % 3]), "score": 90.0 + i} for i in range(count)]
        files[key] = root / f"{key}.csv"
        pd.DataFrame(rows).to_csv(files[key], index=False)
    return files


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card-images")
    for i in range(12):
        save_image(root / f"{i}.png", seed=i)
    files = {}
    for key, rows in (("train", range(8)), ("test", range(8, 12))):
        files[key] = root / f"{key}.csv"
        table = {"image": [f"{i}.png" for i in rows], "label": ["ab"[i % 2] for i in rows],
                 "labels": ["a|b" if i % 3 else "b" for i in rows], "score": [float(i) for i in rows]}
        pd.DataFrame(table).to_csv(files[key], index=False)
    return files


@pytest.fixture(scope="module")
def conll_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card-conll")
    return {key: write(root / f"{key}.conll", corpus(seed, 12)) for seed, key in enumerate(("train", "test"))}


COLUMNS = {"single_label": "topic", "multi_label": "topics", "regression": "score"}  # of the text table
IMAGE_COLUMNS = {"single_label": "label", "multi_label": "labels", "regression": "score"}


def _recipe(task, problem, variant, text_files, image_files, conll_files, pair_data, out):  # noqa: F811
    backbone = out.parent  # a local folder: the card links no hub parent
    data = {"train": str(text_files["train"]), "test": str(text_files["test"]), "text_column": "sentence",
            "label_column": COLUMNS.get(problem)}
    if variant == "pairs":
        data = {key: str(pair_data[key]) for key in ("train", "validation", "test")}
        data.update(text_column="premise", text_pair_column="hypothesis", label_column="relation")
    if task == "token-classification":
        data = {"train": str(conll_files["train"]), "test": str(conll_files["test"]), "max_length": 32}
    if task == "image-classification":
        backbone = "efficientnet-lite0"
        data = {"train": str(image_files["train"]), "test": str(image_files["test"]),
                "label_column": IMAGE_COLUMNS[problem]}
    head = {"type": "mlp", "hidden": [8]} if variant == "kit head" else {}
    if task != "token-classification":  # a token recipe names no problem: the task's own is taken
        head["problem"] = problem
    return to_recipe({"task": task, "backbone": {"name": str(backbone)}, "head": head,
                      "data": data, "output": {"dir": str(out)}})


def _card(case, text_files, image_files, conll_files, pair_data, tmp_path) -> tuple[str, str, str]:  # noqa: F811
    task, problem, variant = case
    recipe = _recipe(task, problem, variant, text_files, image_files, conll_files, pair_data, tmp_path / "run")
    splits = get_task(task).load_splits(recipe)
    native = get_task(task).library == "timm" or is_native(recipe)
    card = model_card(recipe, splits, {}, native=native)
    body = card.split("\n---\n", 1)[1]
    sentence = body.split(f"# {Path(recipe.output.dir).name}\n\n", 1)[1].split("\n", 1)[0]
    usage = body.split("## Use\n\n", 1)[1].split("## Training data", 1)[0]
    return sentence, usage, body


@pytest.mark.parametrize("case", CASES, ids=["/".join(case) for case in CASES])
def test_the_card_says_what_the_model_outputs(case, text_files, image_files, conll_files, pair_data,  # noqa: F811
                                              tmp_path):
    task, problem, variant = case
    sentence, usage, body = _card(case, text_files, image_files, conll_files, pair_data, tmp_path)
    kind = get_task(task).inputs
    labels = re.search(r"^Labels \((\d+)\)", body, re.M)
    if problem == "single_label":  # one label each, scored by a softmax
        assert f"it sorts {kind}s into one of {labels.group(1)} labels." in sentence
        assert "Scores are softmax probabilities over the labels." in usage
    if problem == "multi_label":  # a set of labels: those whose sigmoid passes the threshold
        assert f"it tags {kind}s with any number of {labels.group(1)} labels (an independent score" in sentence
        assert "Labels (" in body and "(threshold 0.5)" in body
        assert "per-label sigmoids; a label applies when its score exceeds 0.5" in usage
    if problem == "regression":  # a number, in the units the targets were given in; no labels
        column = "score"
        assert f"it predicts a number (`{column}`, in the training targets' own units) from a {kind}." in sentence
        assert labels is None and "labels" not in sentence
        assert "The output is the predicted value, in the training targets' own units." in usage
    if problem == "tags":  # a tag per word, read into entities
        assert f"it tags each word of a {kind} with one of {labels.group(1)} tags" in sentence
        assert "entities" in sentence and "number" not in sentence
        assert 'pipeline("token-classification"' in usage and "entity_group" in usage
    if problem != "regression":
        assert "predicts a number" not in sentence
    if task == "image-classification":  # timm's snippet prints what the head computes
        printed = {"single_label": "logits.softmax(-1)", "multi_label": "logits.sigmoid()",
                   "regression": "print(logits.item())"}[problem]
        assert printed in usage and ("label_names" in usage) == (problem != "regression")
    if variant == "pairs":
        assert '"text_pair"' in usage
    if variant == "kit head":
        assert "finetune.load(MODEL)" in usage and "model.predict(texts)" in usage
