"""scripts/bench_sweep.py on a tiny model, one trial a side: the kit's sweep and the Trainer's hyperparameter_search
both run on the same rows and the same sampled learning rate, and the report is written."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
import yaml
from conftest import LABELS, REPO, _rows, subprocess_env, write_csv

SCRIPT = REPO / "scripts" / "bench_sweep.py"

pytest.importorskip("optuna")


def test_the_benchmark_script_imports_nothing_from_the_kit():
    tree = ast.parse(SCRIPT.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] == "finetune"}  # the kit runs as `finetune sweep`


def text_label_csvs(root):
    sizes = {"train": ({"food": 6, "sports": 5, "tech": 5}, 0), "validation": ({k: 3 for k in LABELS}, 1),
             "test": ({k: 3 for k in LABELS}, 2)}
    for name, (counts, seed) in sizes.items():
        write_csv(root / f"{name}.csv", ["text", "label"], _rows(counts, seed))
    return root


@pytest.mark.slow  # both sides of a benchmark script end to end (about 30 s a case); run with -m slow
@pytest.mark.parametrize(("compare", "seeds"), [("full", "42,7"), ("probe", "42")])
def test_both_sides_of_the_sweep_benchmark_run_one_trial(tiny_bert, tmp_path, compare, seeds):
    data = text_label_csvs(tmp_path / "data")
    out, markdown = tmp_path / "sweep.json", tmp_path / "sweep.md"
    markdown.write_text("# Sweeps\n\n<!-- bench:sweep -->\nold\n<!-- /bench:sweep -->\n\nafter\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", data, "--model", tiny_bert, "--trials", "1", "--epochs", "1",
         "--max-length", "16", "--batch-size", "8", "--threads", "1", "--precision", "fp32", "--compare", compare,
         "--seeds", seeds, "--out", out, "--markdown", markdown, "--workdir", tmp_path / "work"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(out.read_text())
    entry = result["comparisons"][compare]
    if "," in seeds:  # one run per training seed on both sides, and the means over them
        runs = entry["seeds"]
        assert [run["seed"] for run in runs] == [42, 7]
        for run in runs:
            kit_recipe = tmp_path / "work" / f"kit-{compare}-seed{run['seed']}.yaml"
            assert str(kit_recipe) in run["kit"]["command"]
            assert yaml.safe_load(kit_recipe.read_text())["train"]["seed"] == run["seed"]
            job = json.loads((tmp_path / "work" / f"trainer-{compare}-seed{run['seed']}.job.json").read_text())
            assert job["seed"] == run["seed"]
        (summary,) = entry["over_seeds"]
        kits = [run["kit"] for run in runs]
        assert summary["kit"]["best_value_mean"] == pytest.approx(sum(k["best"]["value"] for k in kits) / 2)
        assert summary["ratios"]["speedup_to_tested_model"] == pytest.approx(
            sum(run["trainer"]["wall_seconds"] for run in runs) / sum(k["wall_seconds"] for k in kits))
        assert "mean of seeds 42, 7" in markdown.read_text() and "seed 7 |" in markdown.read_text()
        entry = runs[0] | {"seeds": runs}
    kit, trainer = entry["kit"], entry["trainer"]
    assert trainer["rows"] == {"train": 16, "validation": 9, "test": 9} and result["rows"] == "16/9/9"
    assert kit["precision"] == trainer["precision"] == "fp32"
    assert len(kit["trials"]) == len(trainer["trials"]) == 1
    # the same TPE seed draws the same first learning rate on both sides
    assert kit["best"]["params"]["train.lr"] == pytest.approx(trainer["best"]["params"]["learning_rate"], rel=1e-9)
    assert 0 <= kit["best"]["value"] <= 1 and 0 <= trainer["best"]["value"] <= 1
    assert 0 <= kit["test"]["accuracy"] <= 1 and 0 <= trainer["test"]["accuracy"] <= 1
    assert kit["wall_seconds"] > 0 and trainer["wall_seconds"] > trainer["retrain_seconds"] > 0
    for side in (kit, trainer):  # the child's own CPU time, and the machine's load around it
        assert 0 < side["cpu_seconds"] and len(side["load"]) == 2
    assert entry["ratios"]["cpu_ratio"] == pytest.approx(trainer["cpu_seconds"] / kit["cpu_seconds"])
    assert kit["cached_features"] == (compare == "probe")
    assert entry["ratios"]["speedup_to_tested_model"] == pytest.approx(trainer["wall_seconds"] / kit["wall_seconds"])
    text = markdown.read_text()
    assert "old" not in text and text.endswith("after\n") and "AVX" in text and "Trainer (fp32) time / kit time" in text
    assert [b["trainer"]["precision"] for b in entry["baselines"]] == ["fp32"]
    job = json.loads((tmp_path / "work" / f"trainer-{compare}{'-seed42' if ',' in seeds else ''}.job.json").read_text())
    assert job["files"]["train"] == str((data / "train.csv").resolve())
    assert job["freeze_backbone"] == (compare == "probe")


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 10])
def test_the_trainer_side_gets_the_kits_pruning_policy_in_its_own_steps(tiny_bert, tiny_data, tmp_path, epochs):
    import importlib.util

    import optuna
    from conftest import recipe_dict, to_recipe

    from finetune.sweep.study import first_prunable_epoch

    spec = importlib.util.spec_from_file_location("bench_sweep", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    raw = recipe_dict(tiny_bert, tiny_data, tmp_path / "sw", **{"train.epochs": epochs})
    raw["sweep"] = {"space": {"train.lr": {"loguniform": [1e-5, 1e-3]}}}
    first = first_prunable_epoch(to_recipe(raw))
    assert first == bench.first_prunable_epoch(epochs) and 1 <= first and first > epochs / 2
    pruner = bench.trainer_pruner({"epochs": epochs}, steps_per_epoch=25)
    if first >= epochs:  # the kit prunes nothing then
        assert isinstance(pruner, optuna.pruners.NopPruner)
    else:
        assert isinstance(pruner, optuna.pruners.MedianPruner) and pruner._n_warmup_steps == first * 25


def test_trainer_precision_both_adds_the_trainers_default_beside_the_kits_precision():
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sweep", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def asked(precision, trainer):
        return argparse.Namespace(precision=precision, trainer_precision=trainer)

    assert bench.trainer_precisions(asked("auto", "same"), "bf16") == ["bf16"]
    assert bench.trainer_precisions(asked("auto", "both"), "bf16") == ["bf16", "fp32"]
    assert bench.trainer_precisions(asked("auto", "both"), "fp32") == ["fp32"]  # a CPU without bf16: one run
    assert bench.trainer_precisions(asked("fp32", "same"), "fp32") == ["fp32"]
    assert bench.trainer_precisions(asked("auto", "fp32"), "bf16") == ["fp32"]
