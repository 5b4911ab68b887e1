"""`finetune shrink`: a trained run distilled into shallower students, each exported and timed against the run as its
library serves it; the run folder only read; a backbone that cannot be trimmed refused before any training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import call_main, one_error_line, recipe_dict, to_recipe

from finetune.train import train


@pytest.fixture(scope="module")
def teacher(bert4, tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("shrink") / "teacher"
    train(to_recipe(recipe_dict(bert4, tiny_data, run, **{"train.epochs": 8})))
    return run


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def shrunk(teacher: Path, tmp_path: Path, capfd, layers: str) -> tuple[dict, list[str], Path]:
    """`finetune shrink` with --int8 and 12 unlabelled texts; (shrink.json, the table's lines, the output folder),
    the teacher's files checked unchanged."""
    before = hashes(teacher)
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text("\n".join(["the bread and soup", "a team goal today", "code and data news"] * 4) + "\n")
    out = tmp_path / "small"
    result = call_main(capfd, "shrink", teacher, "--layers", layers, "--int8", "--data", unlabeled, "--calls", "4",
                       "--output", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert hashes(teacher) == before  # the teacher's run folder: read, never written
    report = json.loads((out / "shrink.json").read_text())
    return report, result.stdout.strip().splitlines()[-len(report["models"]) - 3:], out  # after training's log


def test_shrink_distils_exports_times_every_model_and_leaves_the_teacher_alone(teacher, tmp_path, capfd):
    report, lines, out = shrunk(teacher, tmp_path, capfd, "2")
    names = [row["model"] for row in report["models"]]
    assert names == ["teacher", "2 layers", "2 layers onnx fp32", "2 layers onnx int8"]
    for row in report["models"]:
        assert set(row) >= {"model", "layers", "runtime", "metric", "p50_ms", "p99_ms", "per_s_batch32", "bytes"}
        assert 0 <= row["metric"] <= 1 and 0 < row["p50_ms"] <= row["p99_ms"] and row["per_s_batch32"] > 0
    assert [row["runtime"] for row in report["models"]] == ["transformers", "transformers", "onnxruntime",
                                                             "onnxruntime"]
    assert report["metric_name"] == "accuracy" and report["split"] == "test" and report["rows_timed"] == 9
    teacher_metrics = json.loads((teacher / "metrics.json").read_text())
    assert report["models"][0]["metric"] == pytest.approx(teacher_metrics["test"]["accuracy"], abs=1e-6)
    student = out / "teacher-2layers"
    student_metrics = json.loads((student / "metrics.json").read_text())
    assert report["models"][1]["metric"] == pytest.approx(student_metrics["test"]["accuracy"], abs=1e-6)
    assert json.loads((student / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    assert student_metrics["distill"]["teacher"] == str(teacher.resolve())
    assert student_metrics["distill"]["unlabeled_rows"] == 12
    assert (student / "export" / "onnx" / "model.onnx").is_file()
    assert (student / "export" / "onnx-int8" / "model.onnx").is_file()
    rows = {row["model"]: row for row in report["models"]}  # int8 is smaller than fp32, 2 layers than 4
    assert rows["2 layers onnx int8"]["bytes"] < rows["2 layers onnx fp32"]["bytes"]
    assert rows["2 layers"]["bytes"] < rows["teacher"]["bytes"]
    assert (out / "shrink.png").stat().st_size > 1000
    # the table: a header with the metric, a line per model (the teacher 1.00x itself), the machine's note
    assert lines[0].split()[:2] == ["model", "accuracy"]
    assert lines[1].startswith("teacher") and lines[1].rstrip().endswith("1.00x")
    assert "timed batch-1 calls after 3 warm-up calls" in lines[-2] and lines[-1].startswith("CPU flags:")


@pytest.mark.slow
def test_shrink_writes_a_student_per_size_each_shallower_and_smaller(teacher, tmp_path, capfd):
    report, lines, out = shrunk(teacher, tmp_path, capfd, "3,2")
    assert [row["model"] for row in report["models"]] == [
        "teacher", "3 layers", "3 layers onnx fp32", "3 layers onnx int8", "2 layers", "2 layers onnx fp32",
        "2 layers onnx int8"]
    rows = {row["model"]: row for row in report["models"]}
    assert rows["2 layers"]["bytes"] < rows["3 layers"]["bytes"] < rows["teacher"]["bytes"]
    for n in (3, 2):
        assert json.loads((out / f"teacher-{n}layers" / "model" / "config.json").read_text())["num_hidden_layers"] == n
    assert lines[0].split()[:2] == ["model", "accuracy"]


def test_a_cnn_that_cannot_be_trimmed_is_refused_in_one_line_before_any_training(tmp_path, capfd):
    from test_vision_train import save_split, vision_raw

    data = {split: save_split(tmp_path / split, count, seed)
            for seed, (split, count) in enumerate((("train", 4), ("validation", 2), ("test", 2)))}
    cnn = tmp_path / "cnn"
    train(to_recipe(vision_raw(data, cnn, **{"train.epochs": 1})))
    line = one_error_line(call_main(capfd, "shrink", cnn, "--layers", "2", "--output", tmp_path / "small"))
    assert "backbone.layers" in line and "pick a smaller model name" in line
    assert not (tmp_path / "small").exists()


def test_bad_layer_lists_and_depths_are_one_line(teacher, tmp_path, capfd):
    line = one_error_line(call_main(capfd, "shrink", teacher, "--layers", "three", "--output", tmp_path / "s"))
    assert line.startswith("finetune: error: --layers: 'three'")
    line = one_error_line(call_main(capfd, "shrink", teacher, "--calls", "0", "--output", tmp_path / "s"))
    assert line.startswith("finetune: error: --calls: 0")
    line = one_error_line(call_main(capfd, "shrink", teacher, "--layers", "9", "--output", tmp_path / "s"))
    assert "backbone.layers: 9 is not between 1 and the 4 layers" in line
    line = one_error_line(call_main(capfd, "shrink", teacher, "--layers", "2", "--data", tmp_path / "no.txt",
                                    "--output", tmp_path / "s"))
    assert line.startswith("finetune: error: --data: '") and "does not exist" in line
    table = tmp_path / "texts.csv"
    table.write_text("body\nthe bread\n")
    line = one_error_line(call_main(capfd, "shrink", teacher, "--layers", "2", "--data", table, "--output",
                                    tmp_path / "s"))
    assert line.startswith("finetune: error: distill.unlabeled:") and "sentence" in line
    line = one_error_line(call_main(capfd, "shrink", teacher, "--output", teacher / "inside"))
    assert "inside the run folder" in line
    assert not (tmp_path / "s").exists()


def test_an_image_run_is_timed_through_plain_timm_and_its_blocks_trimmed(tmp_path, capfd):
    from test_vision_train import save_split, vision_raw

    data = {split: save_split(tmp_path / split, count, seed)
            for seed, (split, count) in enumerate((("train", 4), ("validation", 2), ("test", 2)))}
    vit = tmp_path / "vit"
    train(to_recipe(vision_raw(data, vit, **{"backbone.name": "test_vit", "train.epochs": 1})))
    before = hashes(vit)
    result = call_main(capfd, "shrink", vit, "--layers", "1", "--calls", "2", "--output", tmp_path / "small")
    assert result.returncode == 0, result.stderr[-3000:]
    assert hashes(vit) == before
    report = json.loads((tmp_path / "small" / "shrink.json").read_text())
    assert [(row["model"], row["runtime"]) for row in report["models"]] == [
        ("teacher", "timm"), ("1 layers", "timm"), ("1 layers onnx fp32", "onnxruntime")]
    config = json.loads((tmp_path / "small" / "vit-1layers" / "model" / "config.json").read_text())
    assert config["model_args"]["depth"] == 1
