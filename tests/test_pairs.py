"""Sentence pairs (data.text_pair_column): both texts encoded as the tokenizer's pair, truncation that keeps both,
the data report on pairs, predict and eval on two columns, and the native export in pipeline with text_pair."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import KEYWORDS, LABELS, call_main, one_error_line, recipe_dict, run_without_finetune, to_recipe, \
    write_csv, write_recipe

from finetune.train import train


def pair_rows(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(text, text_pair, label): the label is the second text's topic, the first text's topic is drawn apart from
    it, so the first text alone predicts nothing (chance is 1/3) and a model must read the pair."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        first, second = rng.choice(LABELS), LABELS[i % 3]
        rows.append((f"the {rng.choice(KEYWORDS[first])}", f"a {rng.choice(KEYWORDS[second])}", second))
    return rows


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pairs")
    header = ["premise", "hypothesis", "relation"]
    return {key: write_csv(root / f"{key}.csv", header, pair_rows(count, seed))
            for seed, (key, count) in enumerate((("train", 96), ("validation", 24), ("test", 24)))}


def pair_raw(tiny_bert, data, out, **dotted) -> dict:
    return recipe_dict(tiny_bert, data, out, **{
        "data.text_column": "premise", "data.text_pair_column": "hypothesis", "data.label_column": "relation",
        "train.epochs": 8, "train.lr": 3e-3, **dotted})


@pytest.fixture(scope="module")
def pair_run(tiny_bert, pair_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pair-run") / "run"
    train(to_recipe(pair_raw(tiny_bert, pair_data, out)))
    return out


def test_a_pair_model_learns_what_the_first_text_alone_cannot_tell(pair_run):
    metrics = json.loads((pair_run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.8, metrics["test"]  # chance (and the first text alone) is 1/3
    assert metrics["epochs"][-1]["loss"] < 0.5 * metrics["epochs"][0]["loss"]


def test_both_texts_are_encoded_as_the_tokenizers_pair_and_truncation_keeps_both(tiny_bert):
    from transformers import AutoTokenizer

    from finetune.tasks.text_classification.tokens import tokenize_texts as tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    long = " ".join(["bread"] * 20)
    dataset = tokenize({"text": [long], "text_pair": ["goal match"], "label": [0]}, tokenizer, 10)
    ids, types = dataset[0]["input_ids"], dataset[0]["token_type_ids"]
    assert len(ids) == 10
    words = tokenizer.convert_ids_to_tokens(ids)
    assert words[0] == "[CLS]" and words.count("[SEP]") == 2
    assert words[-3:] == ["goal", "match", "[SEP]"]  # the short second text survives whole
    assert types.count(1) == 3 and types[:7] == [0] * 7  # segment ids: the pair's second part


def test_the_report_counts_pair_lengths_and_leakage_on_the_whole_pair(tiny_bert, pair_data, tmp_path):
    from finetune.checks import check_data

    train_rows = pair_rows(96, 0)
    leaked = [train_rows[0], (train_rows[1][0], "a unseen", train_rows[1][2])]  # a whole pair, then its first text
    validation = write_csv(tmp_path / "validation.csv", ["premise", "hypothesis", "relation"], leaked + pair_rows(6, 9))
    recipe = to_recipe(pair_raw(tiny_bert, {**pair_data, "validation": validation}, tmp_path / "out"))
    report = check_data(recipe)
    assert report.splits["validation"].in_train >= 1
    leakage = [w for w in report.warnings if w.startswith("leakage") and "data.validation" in w]
    assert leakage and "line 2" in leakage[0]
    assert report.splits["train"].tokens["max"] == 7  # [CLS] the x [SEP] a y [SEP]: both texts counted


def test_native_export_scores_pairs_in_pipeline_without_finetune(pair_run, pair_data, tmp_path):
    import finetune

    model = finetune.load(pair_run)
    rows = pair_rows(24, 2)[:6]
    ours = model.predict([{"text": a, "text_pair": b} for a, b, _ in rows])
    script = (
        "import json, sys\n"
        "from transformers import pipeline\n"
        "classify = pipeline('text-classification', model=sys.argv[1], device='cpu')\n"
        "pairs = json.loads(sys.argv[2])\n"
        "found = [classify({'text': a, 'text_pair': b}) for a, b in pairs]\n"
        "print(json.dumps([r[0] if isinstance(r, list) else r for r in found]))\n"
    )
    theirs = run_without_finetune(script, pair_run / "model", json.dumps([[a, b] for a, b, _ in rows]), cwd=tmp_path)
    assert [r["label"] for r in ours] == [r["label"] for r in theirs]
    assert [r["score"] for r in ours] == pytest.approx([r["score"] for r in theirs], abs=1e-5)
    card = (pair_run / "model" / "README.md").read_text()
    assert '"text_pair"' in card


def test_predict_reads_both_columns_and_eval_reproduces_the_test_metrics(pair_run, pair_data, tmp_path, capfd):
    result = call_main(capfd, "predict", pair_run, pair_data["test"], "--json")
    assert result.returncode == 0, result.stderr
    shown = result.stdout.strip()
    answers = json.loads(shown) if shown.startswith("[") else [json.loads(line) for line in shown.splitlines()]
    assert len(answers) == 24 and all(a["label"] in LABELS for a in answers)
    result = call_main(capfd, "eval", pair_run, "--data", pair_data["test"], "--json")
    assert result.returncode == 0, result.stderr
    test = json.loads((pair_run / "metrics.json").read_text())["test"]
    assert json.loads(result.stdout)["metrics"]["accuracy"] == pytest.approx(test["accuracy"])
    assert json.loads(result.stdout)["metrics"]["loss"] == pytest.approx(test["loss"], abs=1e-5)


def test_a_missing_or_empty_pair_column_is_one_error(tiny_bert, pair_data, tmp_path, capfd):
    raw = pair_raw(tiny_bert, pair_data, tmp_path / "out", **{"data.text_pair_column": "hypotesis"})
    line = one_error_line(call_main(capfd, "validate", write_recipe(tmp_path / "a.yaml", raw)))
    assert "hypotesis" in line and "data.text_pair_column" in line and "did you mean" in line
    empty = write_csv(tmp_path / "empty.csv", ["premise", "hypothesis", "relation"],
                      [(a, "", label) for a, _, label in pair_rows(8, 5)])
    raw = pair_raw(tiny_bert, {**pair_data, "train": empty}, tmp_path / "out")
    line = one_error_line(call_main(capfd, "validate", write_recipe(tmp_path / "b.yaml", raw)))
    assert "hypothesis" in line and "empty" in line
    raw = recipe_dict(tiny_bert, {**pair_data, "train": "bbc-news-pairs"}, tmp_path / "out")
    del raw["data"]["validation"], raw["data"]["test"]
    line = one_error_line(call_main(capfd, "validate", write_recipe(tmp_path / "c.yaml", raw)))
    assert "data.text_pair_column" in line and "pairs" in line
