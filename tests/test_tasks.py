"""The task contract: every task and problem runs through run -> eval -> predict -> a model/ folder that the
ecosystem loads natively (no finetune importable) and that computes the kit's own outputs; and where each task lives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import call_main, recipe_dict, run_without_finetune, to_recipe, write_csv
from PIL import Image
from test_pairs import pair_rows
from test_token_classification import PIECES, SPECIAL, corpus, write

from finetune.problems import get
from finetune.tasks import TASKS, get_task
from finetune.train import train

COLOURS = ["blue", "green", "red"]


def colour_table(root: Path, count: int, seed: int) -> Path:
    """A CSV of image paths with a label set (the bright channels) and a number (the mean brightness)."""
    rng = np.random.RandomState(seed)
    rows = []
    for i in range(count):
        bright = [c for c in range(3) if rng.rand() < 0.5] or [i % 3]
        pixels = rng.randint(0, 60, (16, 16, 3))
        for c in bright:
            pixels[..., c] = rng.randint(180, 256, (16, 16))
        name = f"{seed}-{i:03d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(root / name)
        rows.append((name, "|".join(COLOURS[c] for c in bright), float(pixels.mean()), COLOURS[bright[0]]))
    return write_csv(root / f"table-{seed}.csv", ["image", "colours", "brightness", "first"], rows)


@pytest.fixture(scope="module")
def cases(tiny_bert, tiny_data, multi_label_data, regression_data, tmp_path_factory):
    """One tiny run per task and problem: name -> (run folder, labelled test data, inputs to predict)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("contract")
    images = root / "images"
    images.mkdir()
    table = {key: colour_table(images, n, seed) for seed, (key, n) in enumerate((("train", 24), ("test", 9)))}
    tagger = root / "tagger"
    BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + PIECES)}).save_pretrained(tagger)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(SPECIAL + PIECES), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tagger)
    conll = {key: write(root / f"{key}.conll", corpus(seed, n)) for seed, (key, n) in enumerate((("train", 24),
                                                                                                 ("test", 8)))}
    pairs = {key: write_csv(root / f"pairs-{key}.csv", ["premise", "hypothesis", "relation"], pair_rows(n, seed))
             for seed, (key, n) in enumerate((("train", 24), ("test", 6)))}
    same = {"validation": None}
    vision = {"task": "image-classification", "backbone.name": "test_efficientnet", "backbone.pretrained": False,
              "data.image_column": "image", "data.image_size": 32, "data.num_workers": 0, "augment.scale": [1, 1],
              "augment.hflip": 0.0, "data.max_length": 16}
    specs = {
        "text single_label": (tiny_data, {}, tiny_data["test"]),
        "text multi_label": ({"train": multi_label_data, "test": multi_label_data}, {"head.problem": "multi_label"},
                             multi_label_data),
        "text regression": ({"train": regression_data, "test": regression_data}, {"head.problem": "regression"},
                            regression_data),
        "text pairs": (pairs, {"data.text_column": "premise", "data.text_pair_column": "hypothesis",
                               "data.label_column": "relation"}, pairs["test"]),
        "image single_label": (table, {**vision, "data.label_column": "first"}, table["test"]),
        "image multi_label": (table, {**vision, "data.label_column": "colours", "head.problem": "multi_label"},
                              table["test"]),
        "image regression": (table, {**vision, "data.label_column": "brightness", "head.problem": "regression"},
                             table["test"]),
        "tokens": (conll, {"task": "token-classification", "backbone.name": str(tagger)}, conll["test"]),
    }
    runs = {}
    for name, (data, dotted, test) in specs.items():
        raw = recipe_dict(tiny_bert, {**same, **data}, root / name.replace(" ", "-"), **{"train.epochs": 1, **dotted})
        raw["data"]["validation"] = None  # held out of train
        train(to_recipe(raw))
        runs[name] = (root / name.replace(" ", "-"), test)
    return runs


@pytest.mark.parametrize("name", ["text single_label", "text multi_label", "text regression", "text pairs",
                                  "image single_label", "image multi_label", "image regression", "tokens"])
def test_every_task_runs_evaluates_and_predicts(cases, name, capfd):
    run, test = cases[name]
    metrics = json.loads((run / "metrics.json").read_text())
    result = call_main(capfd, "eval", run, "--data", test, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    report = json.loads(result.stdout)["metrics"]
    for key, value in metrics["test"].items():  # the run's test split is the file given
        assert report[key] == pytest.approx(value, abs=1e-4), key
    result = call_main(capfd, "predict", run, test, "--json")
    assert result.returncode == 0, result.stderr
    shown = result.stdout.strip()
    answers = json.loads(shown) if shown.startswith("[") else [json.loads(line) for line in shown.splitlines()]
    assert len(answers) == rows
    problem = json.loads((run / "split.json").read_text())["problem"]
    keys = {"single_label": "label", "multi_label": "labels", "regression": "value", "tags": "entities"}
    assert all(keys[problem] in answer for answer in answers), answers[:2]


NATIVE_SCRIPT = """
import json, sys
sys.modules["finetune"] = None  # the folders must stand on their own
import numpy as np, torch
cases = json.loads(sys.argv[1])
out = {}
for name, (folder, kind, inputs) in cases.items():
    with torch.no_grad():
        if kind == "image":
            import timm
            from PIL import Image
            model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
            transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
            logits = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in inputs]))
        else:
            from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(folder)
            if kind == "tokens":
                model = AutoModelForTokenClassification.from_pretrained(folder).eval()
                batch = tokenizer(inputs, is_split_into_words=True, truncation=True, return_tensors="pt", padding=True)
                logits = model(**batch).logits[0]  # one sentence
            else:
                model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
                firsts = [i[0] if isinstance(i, list) else i for i in inputs]
                seconds = [i[1] for i in inputs] if isinstance(inputs[0], list) else None
                logits = model(**tokenizer(firsts, seconds, truncation=True, padding=True, return_tensors="pt")).logits
    out[name] = logits.tolist()
print(json.dumps(out))
"""


def test_every_model_folder_loads_natively_and_computes_the_kits_outputs(cases, tmp_path):
    import torch

    import finetune

    wanted, ours = {}, {}
    for name, (run, test) in cases.items():
        model = finetune.load(run)
        if name.startswith("image"):
            files = [str(test.parent / f) for f in _column(test, "image")[:4]]
            wanted[name] = (str(run / "model"), "image", files)
            ours[name] = model.logits(files)
        elif name == "tokens":
            words = ["Anna", "Berg", "went", "to", "Kilimanjaro"]
            wanted[name] = (str(run / "model"), "tokens", [words])
            batch = model.preprocess([words], is_split_into_words=True, return_tensors="pt")
            with torch.no_grad():
                ours[name] = model.model(**batch).logits[0].numpy()
        elif name == "text pairs":
            rows = [list(row[:2]) for row in pair_rows(4, 7)]
            wanted[name] = (str(run / "model"), "text", rows)
            ours[name] = model.logits([{"text": a, "text_pair": b} for a, b in rows])
        else:
            texts = _column(test, "sentence")[:4]
            wanted[name] = (str(run / "model"), "text", texts)
            ours[name] = model.logits(texts)
    native = run_without_finetune(NATIVE_SCRIPT, json.dumps(wanted), cwd=tmp_path)
    for name in cases:
        np.testing.assert_allclose(np.asarray(native[name]), ours[name], atol=1e-4, err_msg=name)


def _column(path: Path, column: str) -> list:
    import csv

    with path.open() as file:
        return [row[column] for row in csv.DictReader(file)]


def test_each_task_is_one_folder_named_in_one_table():
    import finetune.tasks as tasks

    folders = sorted(p.parent.name for p in Path(tasks.__file__).parent.glob("*/__init__.py"))
    assert sorted(TASKS) == sorted(m.replace("_", "-") for m in folders)
    assert all(TASKS[name] == f"finetune.tasks.{name.replace('-', '_')}.task" for name in TASKS)
    for name in TASKS:
        task = get_task(name)
        assert task.name == name and task.problems
        for method in ("read", "load_splits", "check_data", "check_eval_inputs", "job"):
            assert callable(getattr(task, method)), (name, method)


def test_every_task_declares_the_whole_interface():
    from finetune.tasks import Task

    # what a task must say for itself: the base class raises NotImplementedError for these
    required = ("read", "load_splits", "check_data", "job", "read_inputs", "parse_input", "logits", "evaluate",
                "card_usage", "card_input_limits", "onnx_usage")
    for name in TASKS:
        task = get_task(name)
        assert isinstance(task, Task), name
        assert task.inputs and task.library and task.column_key
        for method in required:
            assert getattr(type(task), method) is not getattr(Task, method), (name, method)
        assert task.step_choice_applies or task.step_choice(None, False) is None


def test_every_task_reads_serve_inputs_and_refuses_bad_ones():
    import base64
    import io

    from finetune.errors import FinetuneError

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, format="PNG")
    good = {"text-classification": ["a text", {"text": "a", "text_pair": "b"}],
            "image-classification": [base64.b64encode(png.getvalue()).decode()],
            "token-classification": ["John lives here", ["John", "lives"]]}
    bad = {"text-classification": [3, "  ", {"text": "a"}], "image-classification": ["not base64!", 3],
           "token-classification": [[], [""], 3]}
    for name in TASKS:
        task = get_task(name)
        for i, value in enumerate(good[name]):
            shown, entry = task.parse_input(value, i)
            assert isinstance(shown, str) and entry is not None
        for i, value in enumerate(bad[name]):
            with pytest.raises(FinetuneError, match=rf"inputs\[{i}\]"):
                task.parse_input(value, i)


def test_every_card_says_what_its_model_outputs(cases):
    from finetune.predictor import read_run_recipe

    for name, (run, _) in cases.items():
        recipe = read_run_recipe(run)
        task = get_task(recipe.task)
        card = (run / "model" / "README.md").read_text()
        assert task.card_usage(recipe, "MODEL_DIR", True).split("\n")[0] in card, name
        assert task.card_input_limits(recipe) in card, name
        labels = json.loads((run / "split.json").read_text())["labels"]
        sentence = get(recipe.head.problem).card_sentence(f"{task.inputs}", labels, recipe.data.label_column)
        assert f"it {sentence}." in " ".join(card.split()), name
