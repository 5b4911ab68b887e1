"""scripts/bench.py end to end on tiny models: every side runs, on the same rows, and the reports are written."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, recipe_dict, subprocess_env, write_recipe

BENCH = REPO / "scripts" / "bench.py"
WORKERS = REPO / "scripts" / "bench"


def bench(*args, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(BENCH), *map(str, args)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.parametrize("worker", ["trainer_worker.py", "timm_worker.py"])
def test_the_baseline_workers_import_nothing_from_the_kit(worker):
    tree = ast.parse((WORKERS / worker).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] in ("finetune", "bench")}


@pytest.mark.slow  # a benchmark script end to end (20-35 s); run with -m slow
def test_text_benchmark_runs_the_kit_and_the_trainer_on_the_same_rows(tiny_bert, tiny_data, tmp_path):
    recipe = write_recipe(tmp_path / "text.yaml", recipe_dict(tiny_bert, tiny_data, tmp_path / "unused",
                                                              **{"train.epochs": 1, "train.batch_size": 16}))
    out, markdown = tmp_path / "text.json", tmp_path / "bench.md"
    bench(recipe, "--threads", 1, "--out", out, "--markdown", markdown, "--name", "tiny-text", "--workdir",
          tmp_path / "work", "--keep", "--baseline-precision", "both")
    result = json.loads(out.read_text())
    kit, trainer = result["results"]["kit"], result["results"]["trainer"]
    assert trainer["precision"] == "fp32" and result["results"]["trainer-bf16"]["precision"] == "bf16"
    assert result["results"]["trainer-bf16"]["rows"] == kit["rows"]
    assert kit["rows"] == trainer["rows"] == {"train": 16, "validation": 9, "test": 9}
    assert kit["labels"] == trainer["labels"] == ["food", "sports", "tech"]
    assert kit["epochs_run"] == trainer["epochs_run"] == 1 and kit["train_samples_per_second"] > 0
    assert kit["test_rescored"]["accuracy"] == pytest.approx(kit["test"]["accuracy"])
    for side in (kit, trainer):  # process start to the training loop, inside the process's whole life
        assert 0 < side["start_up_seconds"] < side["wall_seconds"]
    assert "start-up seconds" in markdown.read_text()
    assert not [n for n in result["notes"] if "NOT the same job" in n]
    job = json.loads((tmp_path / "work" / "trainer" / "job.json").read_text())
    assert job["files"]["train"].endswith("train.csv")  # the Trainer read the plain files the harness wrote
    text = markdown.read_text()
    assert "<!-- bench:tiny-text -->" in text and result["cpu_flags"] in text
    summary = tmp_path / "summary.md"
    bench("--summary", out, "--markdown", summary, "--name", "speed")
    assert "kit vs Trainer" in summary.read_text() and result["cpu_flags"] in summary.read_text()


def write_images(root: Path) -> dict:
    from PIL import Image

    rng = np.random.RandomState(0)
    folders = {}
    for split, count in (("train", 8), ("validation", 4), ("test", 4)):
        for label, channel in (("blue", 2), ("red", 0)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.randint(0, 90, (16, 16, 3)).astype(np.uint8)
                pixels[..., channel] = 220
                Image.fromarray(pixels).save(folder / f"{i}.png")
        folders[split] = root / split
    return folders


# slow (27 s): the text side keeps the shared harness, files and report from rotting in the default suite
@pytest.mark.slow
def test_image_benchmark_runs_the_kit_and_the_timm_loop_on_the_same_images(tmp_path):
    folders = write_images(tmp_path / "images")
    raw = {
        "task": "image-classification",
        "backbone": {"name": "test_efficientnet", "pretrained": False, "dropout": 0.0},
        "head": {"type": "linear", "dropout": 0.0},
        "data": {**{k: str(v) for k, v in folders.items()}, "image_size": 32, "num_workers": 0},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "warmup": 0, "scheduler": "constant",
                  "precision": "fp32", "seed": 0},
        "output": {"dir": str(tmp_path / "unused")},
    }
    out = tmp_path / "images.json"
    bench(write_recipe(tmp_path / "images.yaml", raw), "--threads", 1, "--out", out)
    result = json.loads(out.read_text())
    kit, timm_loop = result["results"]["kit"], result["results"]["timm"]
    assert kit["rows"] == timm_loop["rows"] == {"train": 16, "validation": 8, "test": 8}
    assert kit["labels"] == timm_loop["labels"] == ["blue", "red"]
    assert kit["epochs_run"] == timm_loop["epochs_run"] == 1 and timm_loop["train_samples_per_second"] > 0
    for side in (kit, timm_loop):
        assert 0 < side["start_up_seconds"] < side["wall_seconds"]


def _bench_ner():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_ner
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return bench_ner


def test_the_ner_benchmark_tags_real_sentences_by_its_rules():
    bench_ner = _bench_ner()
    words = "Mr Tony Blair told the BBC on Monday that London and New York said".split()
    assert bench_ner.tag_sentence(words) == ["O", "B-PER", "I-PER", "O", "O", "B-ORG", "O", "O", "O", "B-LOC", "O",
                                             "B-LOC", "I-LOC", "O"]
    assert "finetune" not in bench_ner.TRAINER_WORKER  # the Trainer side imports nothing from the kit
    sentences = [s for article in ("Headline\nShares in Vodafone Group rose on Friday, Mr Smith said. Too short.",)
                 for s in bench_ner.sentences_of(article)]
    assert sentences == [["Shares", "in", "Vodafone", "Group", "rose", "on", "Friday", ",", "Mr", "Smith", "said", "."]]


# slow (20 s): both sides of scripts/bench_ner.py on a tiny BERT, so the script cannot rot
@pytest.mark.slow
def test_the_ner_benchmark_runs_both_sides_on_the_same_files(tiny_bert, tmp_path):
    bench_ner = _bench_ner()
    out = tmp_path / "ner.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_ner.py"), "--sentences", "200", "--epochs",
                           "1", "--batch-size", "32", "--precision", "fp32", "--backbone", tiny_bert, "--out", out],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["sentences"] == {"train": 200, "validation": 40, "test": 40}
    for side in ("kit", "Trainer (run_ner alignment)"):
        assert 0.0 <= result[side]["test_f1"] <= 1.0 and result[side]["samples_per_second"] > 0
    # the kit's model/ scored in plain transformers gives the kit's own test F1 (first sub-tokens, seqeval)
    assert result["kit"]["test_f1_of_model_folder_in_plain_transformers"] == pytest.approx(result["kit"]["test_f1"])
    assert "finetune" not in bench_ner.NATIVE_WORKER


def test_a_figure_under_kernels_limited_below_the_cpu_says_so(monkeypatch):
    """ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS hold torch's kernels to an older instruction
    set (an AVX2 machine's on an AVX-512 CPU): the machine line and the summary's CPU flags column name it."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from bench import report

    for name in report.KERNEL_LIMITS:
        monkeypatch.delenv(name, raising=False)
    assert "kernels limited" not in report.machine()
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    line = report.machine()
    assert "kernels limited to" in line and "MKL_ENABLE_INSTRUCTIONS=AVX2" in line
    result = {"cpu_flags": "x86_64 AVX2 AVX512_F", "machine": "Xeon (...), kernels limited to AVX2 (...)"}
    assert report._flags_of(result) == "x86_64 AVX2 AVX512_F (kernels limited to AVX2)"
    assert report._flags_of({"machine": "AMD EPYC, 2 usable cores"}) == "not recorded (AMD EPYC)"
