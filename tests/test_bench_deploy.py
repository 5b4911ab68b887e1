"""scripts/bench_deploy.py in its tiny mode: it trains, exports, times every runner, serves, and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import LABELS, REPO, _rows, subprocess_env, write_csv


@pytest.mark.slow  # a benchmark script end to end (20-35 s); run with -m slow
def test_the_deploy_benchmark_runs_end_to_end_on_a_tiny_model(tiny_bert, tmp_path):
    short = tmp_path / "short"
    for seed, (name, count) in enumerate((("train", 8), ("validation", 3), ("test", 6))):
        write_csv(short / f"{name}.csv", ["text", "label"], _rows({k: count for k in LABELS}, seed=seed))
    out = tmp_path / "deploy.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_deploy.py"), str(tmp_path / "work"), "--short", str(short),
         "--text-backbone", str(tiny_bert), "--text-override", "train.lr=3e-3", "--rounds", "1", "--latency", "2",
         "--serve", "12", "--serve-export", "fp32", "--skip-image", "--out", str(out)],
        env=subprocess_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    runners = report["text"]["runners"]
    assert set(runners) == {"pipeline_fp32_torch", "onnx_fp32", "onnx_int8"}
    for row in runners.values():
        assert row["p95_ms"] >= row["p50_ms"] > 0 and row["per_s_batch32"] > 0 and 0 <= row["test_accuracy"] <= 1
        assert row["per_s_list_batch32"] > 0 and row["test_accuracy_list"] == row["test_accuracy"]  # order restored
    # fp32 ONNX labels the test texts as the torch pipeline does: the same accuracy from the same predictions
    assert runners["onnx_fp32"]["test_accuracy"] == pytest.approx(runners["pipeline_fp32_torch"]["test_accuracy"])
    assert runners["onnx_int8"]["bytes"] < runners["onnx_fp32"]["bytes"]
    serve = report["serve"]  # fp32: batched answers equal one-by-one ones (int8's dynamic scales are per batch)
    assert serve["16_clients"]["all_200"] and serve["16_clients"]["same_labels_as_one_client"]
    mixed = serve["mixed"]
    assert mixed["good_answered_200"] == mixed["good"] == mixed["good_same_label"] and mixed["healthy_after"]
    assert mixed["malformed_4xx"] == mixed["malformed"] > 0
    assert report["cpu"] and report["command"].startswith("python scripts/bench_deploy.py")
