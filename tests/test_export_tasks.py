"""ONNX export of sentence pairs and token classification: fp32 == torch, int8 agrees, and predict/eval/serve on the
export give what the torch model gives (labels, entities with their spans, scores)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import call_main, run_export_card, to_recipe
from test_pairs import pair_data, pair_raw  # noqa: F401  (fixtures)
from test_token_task import conll, tagger_backbone, token_raw  # noqa: F401  (fixtures)

import finetune
from finetune.onnx_export import export_onnx, sample_logits
from finetune.train import train

SENTENCES = ["John visited Paris", "Mary and Washington", "the Parisian robot"]
WORDS = [["John", "visited", "Paris"], ["Washington"]]


@pytest.fixture(scope="module")
def pair_run(tiny_bert, pair_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("pair-export") / "run"
    train(to_recipe(pair_raw(tiny_bert, pair_data, out)))
    return out


@pytest.fixture(scope="module")
def token_run(tagger_backbone, conll, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("token-export") / "run"
    train(to_recipe(token_raw(tagger_backbone, conll, out)))
    return out


def _pairs(path) -> list[dict]:
    import csv

    with open(path, newline="") as handle:
        return [{"text": row["premise"], "text_pair": row["hypothesis"]} for row in csv.DictReader(handle)]


def test_a_pair_export_takes_token_type_ids_and_gives_the_torch_logits(pair_run, pair_data):  # noqa: F811
    info = export_onnx(pair_run)
    folder = pair_run / "export" / "onnx"
    assert "token_type_ids" in info["inputs"] and info["parity"]["max_abs_logit_diff"] < 1e-4
    assert info["test"]["onnx"]["accuracy"] == pytest.approx(info["test"]["torch"]["accuracy"])
    pairs = _pairs(pair_data["test"])
    torch_model, onnx_model = finetune.load(pair_run), finetune.load(folder)
    np.testing.assert_allclose(onnx_model.logits(pairs), torch_model.logits(pairs), atol=1e-4)
    # the second text matters: the export must not have frozen token_type_ids (or dropped the pair)
    swapped = [{"text": p["text_pair"], "text_pair": p["text"]} for p in pairs]
    assert not np.allclose(onnx_model.logits(swapped), onnx_model.logits(pairs), atol=1e-3)
    ours, theirs = onnx_model.predict(pairs), torch_model.predict(pairs)
    assert [r["label"] for r in ours] == [r["label"] for r in theirs]


# slow (the default suite's time): int8 is tested on single-label texts by default
@pytest.mark.slow
def test_a_pair_int8_export_agrees_on_the_separable_pairs(pair_run, pair_data, capfd):  # noqa: F811
    result = call_main(capfd, "export", pair_run, "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    info = json.loads((pair_run / "export" / "onnx-int8" / "export.json").read_text())
    assert info["parity"]["agreement"] >= 0.9
    assert info["test"]["onnx"]["accuracy"] >= info["test"]["torch"]["accuracy"] - 0.1
    result = call_main(capfd, "eval", pair_run / "export" / "onnx-int8", "--data", pair_data["test"], "--json",
                       "--text-column", "premise", "--pair-column", "hypothesis", "--label-column", "relation")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["metrics"]["accuracy"] == pytest.approx(info["test"]["onnx"]["accuracy"])


def test_a_token_export_gives_the_torch_logits_per_token_and_the_same_entities(token_run, conll, capfd):  # noqa: F811
    info = export_onnx(token_run)
    folder = token_run / "export" / "onnx"
    assert info["problem"] == "tags" and info["parity"]["agreement_of"] == "sub-tokens"
    assert info["parity"]["max_abs_logit_diff"] < 1e-4 and info["parity"]["agreement"] == 1.0
    assert info["test"]["onnx"]["f1"] == pytest.approx(info["test"]["torch"]["f1"], abs=1e-6)
    config = json.loads((folder / "config.json").read_text())
    assert list(config["id2label"].values()) == info["labels"] and info["labels"][0] == "O"
    torch_model, onnx_model = finetune.load(token_run), finetune.load(folder)
    inputs = SENTENCES + WORDS
    logits = [np.asarray(sample_logits(model, inputs)) for model in (torch_model, onnx_model)]
    assert logits[0].ndim == 3 and logits[0].shape[-1] == len(info["labels"])
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4)
    ours, theirs = onnx_model.predict(inputs), torch_model.predict(inputs)
    assert any(r["entities"] for r in theirs)  # the trained tagger finds entities, so the comparison means something
    for a, b in zip(ours, theirs):
        assert a["tags"] == b["tags"] and a["words"] == b["words"]
        assert [(e["word"], e["label"], e["start"], e["end"]) for e in a["entities"]] == \
            [(e["word"], e["label"], e["start"], e["end"]) for e in b["entities"]]
        assert [e["score"] for e in a["entities"]] == pytest.approx([e["score"] for e in b["entities"]], abs=1e-5)
    torch_eval = call_main(capfd, "eval", token_run, "--data", conll["test"], "--json")
    onnx_eval = call_main(capfd, "eval", folder, "--data", conll["test"], "--json")
    assert onnx_eval.returncode == 0, onnx_eval.stderr
    a, b = json.loads(torch_eval.stdout)["metrics"], json.loads(onnx_eval.stdout)["metrics"]
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-6 for k in a)
    torch_out = call_main(capfd, "predict", token_run, conll["test"], "--json")
    onnx_out = call_main(capfd, "predict", folder, conll["test"], "--json")
    assert onnx_out.returncode == 0, onnx_out.stderr
    rows = [[json.loads(line) for line in out.stdout.splitlines()] for out in (torch_out, onnx_out)]
    assert len(rows[0]) == len(rows[1]) == 16
    for a, b in zip(*rows):
        assert a["tags"] == b["tags"]
        assert [(e["label"], e["start"], e["end"]) for e in a["entities"]] == \
            [(e["label"], e["start"], e["end"]) for e in b["entities"]]


# slow (the default suite's time): int8 is tested on single-label texts by default
@pytest.mark.slow
def test_a_token_int8_export_keeps_the_tags(token_run):
    info = export_onnx(token_run, quantize="int8")
    assert info["quantization"]["method"] == "dynamic"
    assert info["parity"]["agreement"] >= 0.95  # sub-token argmax agreement on the test sentences
    assert info["test"]["onnx"]["f1"] >= info["test"]["torch"]["f1"] - 0.1


def test_serve_tags_words_and_scores_pairs_from_an_export(token_run, pair_run):
    from fastapi.testclient import TestClient

    from finetune.serve import build_app

    for run in (token_run, pair_run):  # the exports the tests above wrote, when they ran first
        if not (run / "export" / "onnx" / "export.json").is_file():
            export_onnx(run)
    answers = []
    for source in (token_run, token_run / "export" / "onnx"):
        with TestClient(build_app(finetune.load(source))) as client:
            response = client.post("/predict", json={"inputs": SENTENCES + WORDS})
            assert response.status_code == 200, response.text
            answers.append(response.json()["predictions"])
            assert client.post("/predict", json={"inputs": [["John", 3]]}).status_code == 400
            assert client.post("/predict", json={"inputs": [[]]}).status_code == 400
    assert [[(e["label"], e["start"], e["end"]) for e in a["entities"]] for a in answers[0]] == \
        [[(e["label"], e["start"], e["end"]) for e in a["entities"]] for a in answers[1]]
    assert answers[0][3]["input"] == "John visited Paris" and answers[0][3]["words"] == WORDS[0]
    pairs = [{"text": "the bread", "text_pair": "a goal"}, {"text": "a goal", "text_pair": "the soup"}]
    labels = []
    for source in (pair_run, pair_run / "export" / "onnx"):
        with TestClient(build_app(finetune.load(source))) as client:
            response = client.post("/predict", json={"inputs": pairs})
            assert response.status_code == 200, response.text
            labels.append([p["label"] for p in response.json()["predictions"]])
            bad = client.post("/predict", json={"inputs": [{"text": "a", "pair": "b"}]})
            assert bad.status_code == 400 and "inputs[0]" in bad.json()["error"]
            assert client.post("/predict", json={"inputs": [{"text": "a", "text_pair": 3}]}).status_code == 400
    assert labels[0] == labels[1]


def _conll_as_jsonl(conll_path, out):
    """The CoNLL file as a JSONL table with its own column names (words, ner), one sentence a row."""
    rows, words, tags = [], [], []
    for line in [*conll_path.read_text().splitlines(), ""]:
        if line.startswith("-DOCSTART-"):
            continue
        if line.strip():
            *word, tag = line.split()
            words.append(word[0])
            tags.append(tag)
        elif words:
            rows.append({"words": words, "ner": tags})
            words, tags = [], []
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


@pytest.fixture(scope="module")
def table_token_run(tagger_backbone, conll, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("token-table")
    data = {key: _conll_as_jsonl(path, root / f"{key}.jsonl") for key, path in conll.items()}
    out = root / "run"
    train(to_recipe(token_raw(tagger_backbone, data, out, tokens_column="words", tags_column="ner")))
    return out, data


def test_predict_and_eval_on_an_export_read_tables_with_the_runs_columns(table_token_run, pair_run, pair_data,  # noqa: F811
                                                                         capfd, tmp_path):
    """A pair run (premise, hypothesis, relation) and a token run on a table (words, ner): `finetune eval EXPORT`
    and `finetune predict EXPORT` take the run's columns as they do for the run folder, with no column options,
    also once the export is copied away from its run."""
    token_run, token_data = table_token_run
    for run, test_file, rows in ((pair_run, pair_data["test"], 24), (token_run, token_data["test"], 16)):
        export_onnx(run)
        moved = tmp_path / run.parent.name
        shutil.copytree(run / "export" / "onnx", moved)
        info = json.loads((moved / "export.json").read_text())
        assert info["recipe"]["data"]["text_column" if run is pair_run else "tokens_column"] in ("premise", "words")
        info["source"] = str(tmp_path / "gone")  # the run is not where the export says it came from
        (moved / "export.json").write_text(json.dumps(info))
        evals = [call_main(capfd, "eval", source, "--data", test_file, "--json") for source in (run, moved)]
        assert evals[1].returncode == 0, evals[1].stderr
        a, b = (json.loads(e.stdout)["metrics"] for e in evals)
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
        predicted = [call_main(capfd, "predict", source, test_file, "--json") for source in (run, moved)]
        assert predicted[1].returncode == 0, predicted[1].stderr
        lines = [[json.loads(line) for line in p.stdout.splitlines()] for p in predicted]
        assert len(lines[0]) == len(lines[1]) == rows
        key = "label" if run is pair_run else "tags"
        assert [line[key] for line in lines[0]] == [line[key] for line in lines[1]]
        assert [line["input"] for line in lines[0]] == [line["input"] for line in lines[1]]
        assert finetune.load(moved).spec["backbone"] == info["recipe"]["backbone"]["name"]  # what serve's /info names


def test_the_cards_of_pair_and_token_exports_run_with_onnxruntime_alone(pair_run, token_run):
    """Each task's card encodes its own inputs: pairs as the tokenizer's pair, word lists with a tag per word."""
    for run in (pair_run, token_run):
        if not (run / "export" / "onnx" / "export.json").is_file():
            export_onnx(run)
    inputs, printed = run_export_card(pair_run / "export" / "onnx")
    assert all(isinstance(pair, tuple) and len(pair) == 2 for pair in inputs)
    assert printed == [[r["label"] for r in finetune.load(pair_run).predict(inputs)]]
    inputs, printed = run_export_card(token_run / "export" / "onnx")
    assert all(isinstance(words, list) for words in inputs)
    expected = [list(zip(r["words"], r["tags"])) for r in finetune.load(token_run).predict(inputs)]
    assert printed == expected and len(printed) == len(inputs)
