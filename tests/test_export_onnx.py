"""ONNX export: each problem's export gives the torch model's logits, int8 agrees, and onnxruntime alone runs it."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import call_main, recipe_dict, run_export_card, run_without_finetune, to_recipe
from test_predict import COLOURS, colour_image  # the same toy images

import finetune
from finetune.onnx_export import export_onnx
from finetune.train import train

TEXTS = ["the bread today", "a goal of news", "very robot story code", "salad and soup", "chip"]


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_data, multi_label_data, regression_data, tmp_path_factory):
    """single-label (native), multi-label (kit format: mlp head, mean pooling) and regression tiny runs."""
    root = tmp_path_factory.mktemp("export-runs")
    multi = {"train": multi_label_data, "validation": multi_label_data, "test": multi_label_data}
    regression = {"train": regression_data, "validation": regression_data, "test": regression_data}
    recipes = {
        "single": recipe_dict(tiny_bert, tiny_data, root / "single", **{"train.epochs": 4}),
        "multi": recipe_dict(tiny_bert, multi, root / "multi", **{
            "head.problem": "multi_label", "head.type": "mlp", "head.hidden": [16], "head.pooling": "mean",
            "train.epochs": 4}),
        "regression": recipe_dict(tiny_bert, regression, root / "regression", **{"head.problem": "regression"}),
    }
    for raw in recipes.values():
        train(to_recipe(raw))
    return {name: root / name for name in recipes}


# multi-label and regression exports: slow (the default suite's time); single-label runs by default
@pytest.mark.parametrize("name", ["single", pytest.param("multi", marks=pytest.mark.slow),
                                  pytest.param("regression", marks=pytest.mark.slow)])
def test_fp32_export_gives_the_torch_logits(runs, name):
    info = export_onnx(runs[name])
    folder = runs[name] / "export" / "onnx"
    written = json.loads((folder / "export.json").read_text())
    assert {"format", "quantize", "opset", "bytes", "source", "parity", "test"} <= set(written)
    assert written["parity"]["max_abs_logit_diff"] < 1e-4 and info["quantize"] is None
    torch_model, onnx_model = finetune.load(runs[name]), finetune.load(folder)
    assert onnx_model.task == torch_model.task and onnx_model.labels == torch_model.labels
    np.testing.assert_allclose(onnx_model.logits(TEXTS), torch_model.logits(TEXTS), atol=1e-4)
    assert onnx_model.predict(TEXTS[:2], top_k=2)[0].keys() == torch_model.predict(TEXTS[:2], top_k=2)[0].keys()


def test_int8_export_agrees_and_reports_the_test_metric(runs, capfd):
    result = call_main(capfd, "export", runs["single"], "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    info = json.loads((runs["single"] / "export" / "onnx-int8" / "export.json").read_text())
    assert info["quantize"] == "int8" and info["quantization"]["method"] == "dynamic"
    assert info["parity"]["agreement"] >= 0.75  # a 32-wide toy model: a few near-tied logits may flip
    assert set(info["test"]["torch"]) == set(info["test"]["onnx"])


def test_eval_and_predict_take_the_export(runs, tiny_data, capfd):
    export_onnx(runs["single"])
    folder = runs["single"] / "export" / "onnx"
    torch_eval = call_main(capfd, "eval", runs["single"], "--data", tiny_data["test"], "--json")
    onnx_eval = call_main(capfd, "eval", folder, "--data", tiny_data["test"], "--json", "--text-column", "sentence",
                          "--label-column", "topic")
    assert onnx_eval.returncode == 0, onnx_eval.stderr
    a, b = json.loads(torch_eval.stdout)["metrics"], json.loads(onnx_eval.stdout)["metrics"]
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    torch_out = call_main(capfd, "predict", runs["single"], *TEXTS, "--json")
    onnx_out = call_main(capfd, "predict", folder, *TEXTS, "--json")
    lines = [[json.loads(line) for line in out.stdout.splitlines()] for out in (torch_out, onnx_out)]  # JSON Lines
    assert len(lines[0]) == len(TEXTS) and [r["label"] for r in lines[0]] == [r["label"] for r in lines[1]]


STANDALONE = """
import json, sys
sys.modules["torch"] = None  # torch may not be imported
sys.modules["finetune"] = None
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
folder, texts = sys.argv[1], sys.argv[2:]
info = json.load(open(folder + "/export.json"))
tokenizer = Tokenizer.from_file(folder + "/tokenizer.json")
tokenizer.enable_padding()
tokenizer.enable_truncation(info["max_length"] or 512)
session = ort.InferenceSession(folder + "/model.onnx")
batch = tokenizer.encode_batch(texts)
feeds = {"input_ids": [e.ids for e in batch], "attention_mask": [e.attention_mask for e in batch],
         "token_type_ids": [e.type_ids for e in batch]}
logits = session.run(None, {k: np.array(feeds[k], dtype=np.int64) for k in info["inputs"]})[0]
print(json.dumps(logits.tolist()))
"""


def test_onnxruntime_alone_runs_the_export(runs, tmp_path):
    export_onnx(runs["multi"])
    folder = runs["multi"] / "export" / "onnx"
    logits = run_without_finetune(STANDALONE, folder, *TEXTS, cwd=tmp_path)
    np.testing.assert_allclose(np.array(logits), finetune.load(runs["multi"]).logits(TEXTS), atol=1e-4)


def test_an_image_export_matches_and_quantises(tmp_path):
    """On a folder of split folders (data.test null, the test split the data set's own): the export scores it too."""
    root = tmp_path
    rng = np.random.RandomState(0)
    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        for colour in COLOURS:
            (root / "data" / split / colour).mkdir(parents=True)
            for i in range(count):
                colour_image(colour, rng).save(root / "data" / split / colour / f"{i}.png")
    raw = {
        "task": "image-classification",
        "backbone": {"name": "test_efficientnet", "pretrained": False, "dropout": 0.0},
        "head": {"type": "linear", "dropout": 0.0},
        "data": {"train": str(root / "data"), "image_size": 32, "num_workers": 0},
        "augment": {"scale": [1.0, 1.0], "hflip": 0.0},
        "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup": 0, "scheduler": "constant",
                  "precision": "fp32", "seed": 0},
        "output": {"dir": str(root / "run")},
    }
    metrics = train(to_recipe(raw))
    info = export_onnx(root / "run")
    assert info["parity"]["max_abs_logit_diff"] < 1e-4
    assert info["test"]["data"] == str(root / "data")  # its test split, as the run tested on it
    assert info["test"]["torch"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert info["test"]["onnx"]["accuracy"] == pytest.approx(info["test"]["torch"]["accuracy"])
    info8 = export_onnx(root / "run", quantize="int8")
    assert info8["quantization"]["method"] in ("static-qdq", "dynamic") and info8["parity"]["agreement"] >= 0.75
    images = [str(p) for p in sorted((root / "data" / "test").rglob("*.png"))]
    np.testing.assert_allclose(finetune.load(root / "run" / "export" / "onnx").logits(images),
                               finetune.load(root / "run").logits(images), atol=1e-4)
    for colour in COLOURS:  # the card's lines on a photo: the label finetune predicts for it
        colour_image(colour, rng).save(root / "photo.jpg")
        _, printed = run_export_card(root / "run" / "export" / "onnx", root / "photo.jpg")
        assert printed == [[finetune.load(root / "run").predict([str(root / "photo.jpg")])[0]["label"]]]


def test_exporting_an_export_is_one_line(runs, capfd):
    export_onnx(runs["single"])
    result = call_main(capfd, "export", runs["single"] / "export" / "onnx")
    assert result.returncode == 2 and "already an ONNX export" in result.stderr


def test_serve_runs_an_export_like_the_torch_model(runs):
    from fastapi.testclient import TestClient

    from finetune.serve import build_app

    export_onnx(runs["single"])
    answers = []
    for source in (runs["single"], runs["single"] / "export" / "onnx"):
        with TestClient(build_app(finetune.load(source))) as client:
            answers.append(client.post("/predict", json={"inputs": TEXTS}).json()["predictions"])
            assert client.get("/info").json()["format"] in ("transformers", "onnx")
    assert [p["label"] for p in answers[0]] == [p["label"] for p in answers[1]]
    assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(*answers))


def test_a_missing_extra_is_one_line_naming_the_pip_install(runs, tmp_path):
    from conftest import REPO, one_error_line, run_cli

    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["onnxruntime"] = None\n')
    line = one_error_line(run_cli("export", runs["single"], PYTHONPATH=f"{tmp_path}:{REPO}"))
    assert 'pip install "finetune[onnx]"' in line and "onnxruntime" in line


def test_text_exports_run_fused_attention_that_masks_the_padding(runs):
    """onnxscript's fusions give `Attention` (fp32) and `QAttention` (int8) fed the padding mask: a short text scores
    the same alone as beside a long one, so padded positions are not attended to."""
    short, long = TEXTS[4], " ".join(TEXTS)
    # int8 quantises activations with one scale per batch, so a neighbour moves the logits a little (0.04 here);
    # a QAttention that attends to the padding moved them by 3
    for quantize, tolerance in ((None, 1e-4), ("int8", 0.5)):
        info = export_onnx(runs["single"], quantize=quantize)
        assert info["fusion"]["Attention"] == 2  # 2 layers
        ops = collections.Counter(node.op_type for node in onnx.load(Path(info["path"]) / "model.onnx").graph.node)
        # residual + LayerNorm back as Add + LayerNormalization (the fused CPU kernel is 3x slower), 2 a layer
        assert "SkipLayerNormalization" not in ops and ops["LayerNormalization"] >= 4
        model = finetune.load(info["path"])
        alone, padded = model.logits([short]), model.logits([short, long])[:1]
        assert np.max(np.abs(alone - padded)) < tolerance
    assert info["quantization"]["quantized_ops"]["QAttention"] == 2


# multi-label and regression exports: slow (the default suite's time); single-label runs by default
@pytest.mark.parametrize("name", ["single", pytest.param("multi", marks=pytest.mark.slow),
                                  pytest.param("regression", marks=pytest.mark.slow)])
def test_the_cards_lines_run_with_onnxruntime_alone_and_print_what_predict_gives(runs, name):
    export_onnx(runs[name])
    inputs, printed = run_export_card(runs[name] / "export" / "onnx")
    results = finetune.load(runs[name]).predict(inputs)
    if name == "single":
        assert printed == [[r["label"] for r in results]]
    elif name == "multi":
        assert printed == [[r["labels"] for r in results]]
    else:
        assert printed[0] == pytest.approx([r["value"] for r in results], abs=1e-4)
