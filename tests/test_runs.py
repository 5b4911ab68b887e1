"""`finetune ls RUNS`: one row per run folder with its backbone, key settings, best and test metric and time."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import call_main, recipe_dict, to_recipe

from finetune.train import train


@pytest.fixture(scope="module")
def runs_folder(tiny_bert, tiny_data, tmp_path_factory):
    """runs/ with a finished run, a copy of it as if trained with another lr, an unfinished run, and clutter."""
    root = tmp_path_factory.mktemp("runs-folder") / "runs"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, root / "topics-a")))
    shutil.copytree(root / "topics-a", root / "sweep" / "topics-b")  # nested one level deeper
    config = yaml.safe_load((root / "sweep" / "topics-b" / "config.yaml").read_text())
    config["train"]["lr"] = 3e-4
    (root / "sweep" / "topics-b" / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "crashed").mkdir()
    (root / "crashed" / "config.yaml").write_text((root / "topics-a" / "config.yaml").read_text())
    (root / "notes").mkdir()  # not a run: ignored
    return root


def test_ls_on_a_folder_compares_its_runs(runs_folder, capfd):
    result = call_main(capfd, "ls", runs_folder)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split()[:4] == ["run", "backbone", "data", "settings"]
    assert [row.split()[0] for row in rows] == ["crashed", "sweep/topics-b", "topics-a"]
    metrics = json.loads((runs_folder / "topics-a" / "metrics.json").read_text())
    best = f"accuracy {metrics['best']['accuracy']:.4f} @{metrics['best']['epoch']}"
    assert best in rows[2] and f"{metrics['test']['accuracy']:.4f}" in rows[2]
    assert "lr 0.001" in rows[2] and "lr 0.0003" in rows[1] and "len 16" in rows[2] and "bs 8" in rows[2]
    assert "unfinished" in rows[0]


def test_ls_json_has_the_numbers(runs_folder, capfd):
    rows = json.loads(call_main(capfd, "ls", runs_folder, "--json").stdout)
    by_name = {row["run"]: row for row in rows}
    metrics = json.loads((runs_folder / "topics-a" / "metrics.json").read_text())
    assert by_name["topics-a"]["best"] == metrics["best"]["accuracy"]
    assert by_name["topics-a"]["test"] == metrics["test"]["accuracy"]
    assert by_name["topics-a"]["seconds"] == metrics["train"]["seconds"]
    assert by_name["crashed"]["status"] == "unfinished" and by_name["crashed"]["best"] is None


def test_ls_on_one_run_and_on_a_missing_folder(runs_folder, capfd):
    result = call_main(capfd, "ls", runs_folder / "topics-a")
    assert len(result.stdout.strip().splitlines()) == 2
    result = call_main(capfd, "ls", runs_folder / "nope")
    assert result.returncode == 2 and "no such folder" in result.stderr
    result = call_main(capfd, "ls")  # no folder: the built-in recipes, as before
    assert "text/minilm-bbc-news" in result.stdout
