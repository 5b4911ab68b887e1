"""`finetune curve`: every method x size x seed as a run under one folder, curve.json and curve.png complete, a rerun
that trains nothing, the classical baseline above chance, and methods that do not apply refused before any run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LABELS, _rows, call_main, one_error_line, recipe_dict, write_csv, write_recipe

HEADER = ["sentence", "topic"]


@pytest.fixture(scope="module")
def curve_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("curve-data")
    return {"train": write_csv(root / "train.csv", HEADER, _rows({k: 12 for k in LABELS}, seed=3)),
            "validation": write_csv(root / "validation.csv", HEADER, _rows({k: 3 for k in LABELS}, seed=5)),
            "test": write_csv(root / "test.csv", HEADER, _rows({k: 10 for k in LABELS}, seed=4))}


@pytest.fixture(scope="module")
def curve_recipe(tiny_bert, curve_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("curve")
    # the recipe's own stage settings are what the contrastive method runs; probe and baseline drop them
    raw = recipe_dict(tiny_bert, curve_data, root / "run", **{"train.epochs": 3, "train.log_with": [],
                                                              "head.pooling": "mean",
                                                              "contrastive": {"pairs": 4, "lr": 3e-3}})
    return write_recipe(root / "tiny.yaml", raw)


def test_curve_writes_every_point_and_a_rerun_trains_nothing(curve_recipe, tmp_path, capfd):
    out = tmp_path / "curve"
    argv = ("curve", curve_recipe, "--per-class", "2,8", "--seeds", "1", "--methods", "probe,contrastive,baseline",
            "--output", out)
    first = call_main(capfd, *argv)
    assert first.returncode == 0, first.stderr[-3000:]
    curve = json.loads((out / "curve.json").read_text())
    points = {(p["method"], p["per_class"], p["seed"]): p for p in curve["points"]}
    assert set(points) == {(m, n, 0) for m in ("probe", "contrastive", "baseline") for n in (2, 8)}
    assert all(p["rows"] == 3 * p["per_class"] and p["metric"] == "accuracy" and p["seconds"] >= 0
               for p in points.values())
    assert (out / "curve.png").stat().st_size > 10_000
    assert "curve: contrastive n=8 seed 0 (4/6): accuracy " in first.stdout
    assert "method" in first.stdout and "per class" in first.stdout  # the table
    assert not (out / "probe" / "n-2" / "seed-0" / "model").exists()  # no weights kept per point
    assert not (out / "contrastive" / "n-8" / "seed-0" / "checkpoints").exists()
    trained = json.loads((out / "contrastive" / "n-8" / "seed-0" / "metrics.json").read_text())
    assert trained["train"]["contrastive"]["pairs"] > 0  # the method really ran the stage
    assert "contrastive" not in json.loads((out / "probe" / "n-8" / "seed-0" / "metrics.json").read_text())["train"]
    assert points[("baseline", 8, 0)]["test"] > 0.6  # TF-IDF + logistic regression, far above chance (1/3)

    written = {path: path.stat().st_mtime_ns for path in out.rglob("metrics.json")}
    again = call_main(capfd, *argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before") == 6
    assert {path: path.stat().st_mtime_ns for path in out.rglob("metrics.json")} == written
    assert json.loads((out / "curve.json").read_text())["points"] == curve["points"]


def test_bad_methods_sizes_and_tasks_are_refused_in_one_line_before_any_run(curve_recipe, tmp_path, capfd):
    out = tmp_path / "curve"
    line = one_error_line(call_main(capfd, "curve", curve_recipe, "--methods", "probe,setfit", "--output", out))
    assert line.endswith("--methods: unknown method 'setfit'; choose from full, probe, contrastive, lora, scratch, "
                         "baseline")
    line = one_error_line(call_main(capfd, "curve", curve_recipe, "--per-class", "4,13", "--output", out))
    assert "data.train_per_class: 13 rows per class asked, but class" in line and "has only 12" in line
    line = one_error_line(call_main(capfd, "curve", curve_recipe, "--per-class", "x", "--output", out))
    assert "--per-class: expected rows per class" in line
    assert not out.exists()


def test_methods_a_task_does_not_take_are_refused(tiny_bert, tmp_path, capfd):
    from test_token_classification import corpus, write

    data = {key: write(tmp_path / f"{key}.conll", corpus(seed, 40)) for seed, key in enumerate(("train", "test"))}
    raw = {"task": "token-classification", "backbone": {"name": str(tiny_bert)},
           "data": {"train": str(data["train"]), "test": str(data["test"])}, "output": {"dir": str(tmp_path / "r")}}
    recipe = write_recipe(tmp_path / "tags.yaml", raw)
    line = one_error_line(call_main(capfd, "curve", recipe, "--per-class", "2", "--methods", "probe,contrastive"))
    assert line.startswith("finetune: error: curve: method 'contrastive' does not apply to this recipe (drop it from "
                           "--methods): ")
    assert "contrastive: tunes a backbone on pairs of labelled texts; token-classification does not take it" in line
    line = one_error_line(call_main(capfd, "curve", recipe, "--per-class", "2", "--methods", "baseline"))
    assert "curve: method 'baseline' does not apply: token-classification has no classical baseline" in line
    assert not (tmp_path / "r-curve").exists()


def test_the_few_label_recipe_trains_on_a_file_that_holds_every_label_there_is(tiny_bert, curve_data, tmp_path):
    import finetune

    few = write_csv(tmp_path / "few.csv", HEADER, _rows({k: 4 for k in LABELS}, seed=7))  # 12 rows, no validation
    run = finetune.run("text/minilm-few-labels", {
        "backbone.name": str(tiny_bert), "data.train": str(few), "data.test": str(curve_data["test"]),
        "data.text_column": "sentence", "data.label_column": "topic", "data.max_length": 16, "train.epochs": 4,
        "contrastive.pairs": 4}, output_dir=tmp_path / "run")
    split = json.loads((run.dir / "split.json").read_text())
    assert split["splits"]["validation"]["count"] == 1 and split["splits"]["train"]["count"] == 11
    assert [entry["epoch"] for entry in run.metrics["epochs"]] == [4]  # one evaluation, after the last epoch
    assert run.metrics["train"]["contrastive"]["pairs"] > 0


def test_a_point_that_learned_nothing_is_marked_in_the_table_and_the_picture(tmp_path):
    from finetune.curve import curve_table, draw, summary

    points = [{"method": "full", "per_class": 8, "seed": seed, "rows": 24, "metric": "accuracy", "test": value,
               "seconds": 1.0, "learned": learned}
              for seed, (value, learned) in enumerate([(0.9, True), (0.34, False), (0.88, True)])]
    rows = summary(points)
    assert rows[0]["learned_nothing"] == [0.34] and rows[0]["seeds"] == 3
    assert curve_table(rows, "accuracy").splitlines()[1].endswith("1 learned nothing")
    assert "learned nothing" not in curve_table(summary([p for p in points if p["learned"]]), "accuracy")
    draw(rows, "accuracy", 3, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
