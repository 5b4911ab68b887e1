"""Token classification as a task: `finetune run` on CoNLL files, its metrics, predict's entities, eval, and the
exported folder in transformers' pipeline with no finetune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import call_main, one_error_line, run_without_finetune, write_recipe
from test_token_classification import PIECES, SPECIAL, corpus, write


@pytest.fixture(scope="module")
def tagger_backbone(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT whose WordPiece vocabulary splits some place names into several sub-tokens."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path_factory.mktemp("tagger-bert")
    BertTokenizer(vocab={word: i for i, word in enumerate(SPECIAL + PIECES)}).save_pretrained(directory)
    config = BertConfig(vocab_size=len(SPECIAL + PIECES), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def conll(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conll")
    return {key: write(root / f"{key}.conll", corpus(seed, count))
            for seed, (key, count) in enumerate((("train", 64), ("validation", 16), ("test", 16)))}


def token_raw(backbone: Path, data: dict[str, Path], out: Path, **data_keys) -> dict:
    return {
        "task": "token-classification",
        "backbone": {"name": str(backbone), "dropout": 0.0},
        "head": {"dropout": 0.0},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]), "test": str(data["test"]),
                 "max_length": 32, **data_keys},
        "train": {"epochs": 6, "batch_size": 8, "lr": 3e-3, "warmup": 0, "scheduler": "constant",
                  "precision": "fp32", "seed": 0},
        "output": {"dir": str(out)},
    }


@pytest.fixture(scope="module")
def token_run(tagger_backbone, conll, tmp_path_factory) -> Path:
    from conftest import to_recipe

    from finetune.train import train

    out = tmp_path_factory.mktemp("token-run") / "run"
    train(to_recipe(token_raw(tagger_backbone, conll, out)))
    return out


def test_a_token_run_learns_the_entities_and_writes_entity_metrics(token_run):
    metrics = json.loads((token_run / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4, 5, 6]
    assert {"f1", "precision", "recall", "token_accuracy", "loss"} <= set(metrics["test"])
    assert metrics["epochs"][-1]["loss"] < 0.5 * metrics["epochs"][0]["loss"]
    assert metrics["test"]["f1"] > 0.8, metrics["test"]  # an all-O tagger scores 0
    assert metrics["best"]["epoch"] >= 1 and "f1" in metrics["best"]
    per_entity = metrics["per_entity"]
    assert per_entity["types"] == ["LOC", "PER"] and per_entity["split"] == "test"
    split = json.loads((token_run / "split.json").read_text())
    assert split["labels"] == ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"] and split["scheme"] == "IOB2"


def test_predict_gives_entities_with_character_spans(token_run, capfd):
    text = "Anna Berg went to Kilimanjaro"
    result = call_main(capfd, "predict", token_run, text, "--json")
    assert result.returncode == 0, result.stderr
    shown = result.stdout.strip()  # one JSON object per input (an indented array before JSON lines)
    answer = json.loads(shown)[0] if shown.startswith("[") else json.loads(shown.splitlines()[0])
    found = [(e["label"], text[e["start"]:e["end"]]) for e in answer["entities"]]
    assert found == [("PER", "Anna Berg"), ("LOC", "Kilimanjaro")]
    assert all(0 < e["score"] <= 1 and e["word"] == text[e["start"]:e["end"]] for e in answer["entities"])


def test_eval_on_the_test_file_reproduces_the_runs_test_metrics(token_run, conll, capfd):
    result = call_main(capfd, "eval", token_run, "--data", conll["test"], "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((token_run / "metrics.json").read_text())["test"]
    report = json.loads(result.stdout)
    for name in ("f1", "precision", "recall", "token_accuracy", "loss"):
        assert report["metrics"][name] == pytest.approx(metrics[name], abs=1e-5), name


def test_the_exported_folder_tags_in_transformers_pipeline_without_finetune(token_run, tmp_path):
    card = (token_run / "model" / "README.md").read_text()
    assert 'pipeline("token-classification"' in card
    script = (
        "import json, sys\n"
        "from transformers import pipeline\n"
        "pipe = pipeline('token-classification', model=sys.argv[1], aggregation_strategy='first', device='cpu')\n"
        "print(json.dumps([[e['entity_group'], e['start'], e['end']] for e in pipe(sys.argv[2])]))\n"
    )
    text = "in New York , John said ."
    found = run_without_finetune(script, token_run / "model", text, cwd=tmp_path)
    assert [(kind, text[start:end]) for kind, start, end in found] == [("LOC", "New York"), ("PER", "John")]


def test_validate_reports_entities_and_a_tag_unseen_in_train_is_one_error(tagger_backbone, conll, tmp_path, capfd):
    recipe = write_recipe(tmp_path / "r.yaml", token_raw(tagger_backbone, conll, tmp_path / "out"))
    result = call_main(capfd, "validate", recipe)
    assert result.returncode == 0, result.stderr
    assert "entities (IOB2)" in result.stderr and "LOC" in result.stderr
    bad = write(tmp_path / "bad.conll", "Paris B-LOC\n\nJohn B-MISC\n")
    raw = token_raw(tagger_backbone, {**conll, "validation": bad}, tmp_path / "out")
    line = one_error_line(call_main(capfd, "validate", write_recipe(tmp_path / "bad.yaml", raw)))
    assert "B-MISC" in line and "bad.conll" in line and "line 3" in line


def test_eval_output_writes_each_sentences_predicted_tags(token_run, conll, tmp_path, capfd):
    output = tmp_path / "tags.jsonl"
    result = call_main(capfd, "eval", token_run, "--data", conll["test"], "--output", output)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 16
    for record in records:
        assert len(record["predicted"].split()) == len(record["tokens"].split()) == len(record["tags"].split())
    assert sum(r["correct"] for r in records) >= 8  # the tagger gets most sentences right


def test_lora_with_a_mid_run_resume_equals_the_uninterrupted_token_run(tagger_backbone, conll, tmp_path):
    from conftest import set_dotted, to_recipe
    from test_resume import _cut_after_first_checkpoint, assert_identical

    from finetune.train import train

    def raw(out):
        recipe = token_raw(tagger_backbone, conll, out)
        for key, value in {"backbone.dropout": 0.1, "lora": {"r": 4}, "train.epochs": 2, "train.checkpoint_every": 3,
                           "train.keep_checkpoints": 10, "train.lr": 1e-2}.items():
            set_dotted(recipe, key, value)
        return to_recipe(recipe)

    whole, out = tmp_path / "whole", tmp_path / "run"
    train(raw(whole))
    train(raw(out))
    _cut_after_first_checkpoint(out)
    train(raw(out), resume=True)
    assert "resumed from" in (out / "train.log").read_text()
    assert_identical(out, whole)
    assert (whole / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((whole / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]  # merged back into the native class


# slow (the default suite's time): two processes; test_train holds 2 == 1 by default
@pytest.mark.slow
def test_two_processes_gather_every_sentence_of_uneven_lengths(tagger_backbone, conll, tmp_path, capfd):
    """torchrun x 2: sentences of different lengths on each process are padded before gathering, so the run's test
    metrics are those of the same model evaluated in one process."""
    import subprocess
    import sys

    from conftest import subprocess_env

    out = tmp_path / "two"
    recipe = write_recipe(tmp_path / "r.yaml", token_raw(tagger_backbone, conll, out))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "finetune", "run", str(recipe), "train.batch_size=4", "train.epochs=3"]
    done = subprocess.run(command, check=False, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2
    result = call_main(capfd, "eval", out, "--data", conll["test"], "--json")
    report = json.loads(result.stdout)["metrics"]
    for name in ("f1", "token_accuracy", "loss"):
        assert report[name] == pytest.approx(metrics["test"][name], abs=1e-5), name


@pytest.mark.parametrize("name, text, named", [
    ("notag.conll", "John B-PER\nSmith\n", "line 2"),  # a line with a word and no tag column
    ("long.jsonl", '{"tokens": ["John"], "tags": ["B-PER"]}\n{"tokens": ["a", "b"], "tags": ["O", "O", "O"]}\n',
     "line 2"),  # more tags than words
])
def test_bad_token_files_are_one_line_naming_the_file_and_line(tagger_backbone, conll, tmp_path, capfd, name, text,
                                                              named):
    bad = write(tmp_path / name, text)
    out = tmp_path / "out"
    for verb in ("validate", "run"):
        raw = token_raw(tagger_backbone, {**conll, "train": bad}, out)
        result = call_main(capfd, verb, write_recipe(tmp_path / "r.yaml", raw))
        line = one_error_line(result)
        assert name in line and named in line, line
    assert not out.exists()


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {name.removeprefix("bert."): tensor for name, tensor in load_file(folder / "model.safetensors").items()}


def test_a_frozen_backbone_keeps_the_pretrained_weights_and_the_tagging_layer_learns(tagger_backbone, conll,
                                                                                     tmp_path):
    from conftest import to_recipe

    from finetune.train import train

    raw = token_raw(tagger_backbone, conll, tmp_path / "run")
    raw["train"].update(freeze="backbone", epochs=3, lr=3e-2)
    train(to_recipe(raw))
    pretrained, trained = _weights(tagger_backbone), _weights(tmp_path / "run" / "model")
    assert {name for name in trained if name.startswith("classifier.")} == {"classifier.weight", "classifier.bias"}
    shared = [name for name in pretrained if name in trained]
    assert set(pretrained) - set(shared) == {"pooler.dense.weight", "pooler.dense.bias"}  # a tagger has no pooler
    assert all(torch_equal(pretrained[n], trained[n]) for n in shared)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"][-1]["loss"] < metrics["epochs"][0]["loss"]  # the tagging layer alone learned


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_layer_decay_slows_the_lower_layers_of_a_tagger(tagger_backbone, conll, tmp_path):
    """Adam's step is about the lr whatever the gradient: with decay 0.01 the embeddings (depth 0 of a 2-layer
    tagger, which has no pooler) train at 0.01 ** 3 of the lr, the top layer at 0.01 of it."""
    from conftest import to_recipe

    from finetune.train import train

    pretrained = _weights(tagger_backbone)
    moved = {}
    for decay in (None, 0.01):
        raw = token_raw(tagger_backbone, conll, tmp_path / f"run-{decay}")
        raw["train"].update(epochs=1, layer_decay=decay, head_lr=None)
        train(to_recipe(raw))
        trained = _weights(tmp_path / f"run-{decay}" / "model")
        moved[decay] = {part: float((trained[name] - pretrained[name]).abs().max()) for part, name in (
            ("embeddings", "embeddings.word_embeddings.weight"),
            ("top layer", "encoder.layer.1.output.dense.weight"))}
    assert moved[None]["embeddings"] > 0 and moved[0.01]["embeddings"] < 1e-3 * moved[None]["embeddings"]
    assert moved[0.01]["top layer"] < 0.1 * moved[None]["top layer"]  # the layer just below the head: 0.01 x lr
    assert moved[0.01]["embeddings"] < moved[0.01]["top layer"]
