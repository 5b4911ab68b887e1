"""The Python API as a notebook uses it: `import finetune` alone trains, evaluates, predicts and exports, with the
CLI's numbers and the CLI's error lines; importing and loading change nothing process-wide."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import LABELS, call_main, one_error_line, recipe_dict, run_cli, subprocess_env, write_recipe

import finetune

API = ("run", "validate", "evaluate", "load", "export")
TEXTS = ["the goal today news", "a chip of data story", "very rice and soup"]
CLOCK_AND_MEMORY = ("second", "phases", "memory")  # the metrics.json keys that vary from process to process
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

NOTEBOOK = r"""
import json, sys
from pathlib import Path

import finetune
from finetune import allocator
from finetune.recipe import to_dict

recipe, out, test, texts = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
run = finetune.run(recipe, overrides={"train.epochs": 2}, output_dir=out)
scores = finetune.evaluate(run, test, text_column="sentence", label_column="topic")
predicted = run.load().predict(texts)
folder = finetune.export(run)
exported = finetune.load(folder).predict(texts)
print(json.dumps({"dir": str(run.dir), "metrics": run.metrics, "recipe": to_dict(run.recipe), "eval": scores,
                  "rows": scores.report["rows"], "predicted": predicted, "export": str(folder), "exported": exported,
                  "kept": allocator.kept(), "repr": repr(run)}))
"""


def without_timings(tree):
    """metrics.json less the clock and the process's peak memory: two runs of one recipe agree on the rest."""
    if isinstance(tree, dict):
        return {k: without_timings(v) for k, v in tree.items() if not any(w in k for w in CLOCK_AND_MEMORY)}
    if isinstance(tree, list):
        return [without_timings(item) for item in tree]
    return tree


@pytest.fixture(scope="module")
def both_runs(tiny_bert, tiny_data, tmp_path_factory):
    """One recipe trained twice at once: by a notebook-style script through `import finetune` alone, and by
    `finetune run`; each in a fresh process."""
    root = tmp_path_factory.mktemp("api")
    raw = recipe_dict(tiny_bert, tiny_data, root / "unused", **{"train.epochs": 1})
    del raw["output"]
    recipe = write_recipe(root / "tiny.yaml", raw)
    notebook = [sys.executable, "-c", NOTEBOOK, json.dumps(raw), root / "api-run", tiny_data["test"], json.dumps(TEXTS)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        api = pool.submit(subprocess.run, [str(a) for a in notebook], capture_output=True, text=True, timeout=300,
                          env=subprocess_env())
        cli = pool.submit(run_cli, "run", recipe, "train.epochs=2", f"output.dir={root / 'cli-run'}")
        api, cli = api.result(), cli.result()
    assert api.returncode == 0, api.stderr[-3000:]
    assert cli.returncode == 0, cli.stderr[-3000:]
    return json.loads(api.stdout.strip().splitlines()[-1]), root / "cli-run"


def test_a_notebook_trains_with_the_clis_numbers(both_runs):
    answer, cli_dir = both_runs
    cli_metrics = json.loads((cli_dir / "metrics.json").read_text())
    assert answer["metrics"] == json.loads((Path(answer["dir"]) / "metrics.json").read_text())  # Run.metrics is it
    assert [e["epoch"] for e in answer["metrics"]["epochs"]] == [1, 2]  # the override over the dict's 1 epoch
    assert without_timings(answer["metrics"]) == without_timings(cli_metrics)
    assert answer["metrics"]["test"]["accuracy"] > 1 / len(LABELS)  # it learnt something
    cli_recipe = yaml.safe_load((cli_dir / "config.yaml").read_text())
    assert answer["recipe"]["output"]["dir"] == answer["dir"]
    assert {**answer["recipe"], "output": None} == {**cli_recipe, "output": None}  # one resolved recipe
    assert answer["repr"].startswith(f"Run({answer['dir']!r}, test: loss ")


def test_evaluate_predict_and_export_from_the_run(both_runs):
    answer, _ = both_runs
    test = answer["metrics"]["test"]
    assert answer["rows"] == 9 and set(answer["eval"]) == set(test)  # the test split's metrics, by their names
    assert answer["eval"] == pytest.approx(test, abs=1e-5)
    assert all(row["label"] in LABELS for row in answer["predicted"])
    assert [row["label"] for row in answer["exported"]] == [row["label"] for row in answer["predicted"]]
    export = Path(answer["export"])
    assert export == Path(answer["dir"]) / "export" / "onnx" and (export / "model.onnx").is_file()
    if GLIBC:  # run owns the process's allocator setting (a CPU machine)
        assert answer["kept"] is None or answer["kept"].startswith("memory: glibc's malloc keeps")


def test_the_cli_evaluates_through_the_api_with_the_same_report(both_runs, tiny_data, capfd):
    answer, cli_dir = both_runs
    result = call_main(capfd, "eval", cli_dir, "--data", tiny_data["test"], "--text-column", "sentence",
                       "--label-column", "topic", "--json")
    assert result.returncode == 0, result.stderr
    report = finetune.evaluate(cli_dir, tiny_data["test"], text_column="sentence", label_column="topic").report
    assert json.loads(result.stdout) == json.loads(json.dumps(report))
    assert report["metrics"] == pytest.approx(answer["eval"], abs=1e-6)  # the two runs' models agree too


LOAD_TOUCHES_NOTHING = r"""
import json, sys
import finetune
from finetune import allocator

imported = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
predictor = finetune.load(sys.argv[1])
predictor.predict(["the goal today news"] * 40, batch_size=8)
after_load = allocator.kept()
from finetune.cli import main
code = main(["predict", sys.argv[1], "the goal today news"])
print(json.dumps({"imported": imported, "after_load": after_load, "code": code, "after_cli": allocator.kept()}))
"""


def test_import_and_load_leave_the_allocator_alone_and_the_cli_sets_it(both_runs):
    _, cli_dir = both_runs
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("MALLOC_")}  # glibc's own settings off
    done = subprocess.run([sys.executable, "-c", LOAD_TOUCHES_NOTHING, str(cli_dir)], capture_output=True, text=True,
                          env=env, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["imported"] == []  # `import finetune` is cheap: no torch, no transformers, not even numpy
    assert answer["after_load"] is None and answer["code"] == 0
    if GLIBC:
        assert answer["after_cli"].startswith("memory: glibc's malloc keeps")  # the CLI's process: set


# ---------------------------------------------------------------------------------------------------------------
# recipes, overrides and errors (no training)


def test_overrides_as_a_dict_and_as_a_list_resolve_alike(tiny_bert, tiny_data, tmp_path, capfd):
    from finetune.api import resolve_recipe
    from finetune.recipe import to_dict

    raw = recipe_dict(tiny_bert, tiny_data, tmp_path / "out")
    as_dict = {"train.lr": 3e-5, "head.dropout": 0.2, "lora": None, "data.test": tiny_data["validation"]}
    as_list = ["train.lr=3e-5", "head.dropout=0.2", "lora=null", f"data.test={tiny_data['validation']}"]
    resolved = to_dict(resolve_recipe(raw, as_dict))
    assert resolved == to_dict(resolve_recipe(raw, as_list))
    assert resolved["train"]["lr"] == 3e-5 and resolved["data"]["test"] == str(tiny_data["validation"])
    path = write_recipe(tmp_path / "r.yaml", raw)
    result = call_main(capfd, "validate", path, *as_list)  # the CLI resolves it the same way
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == resolved
    assert raw["train"]["lr"] == 1e-3  # the caller's dict is left as it was


def test_validate_returns_the_data_report(make_recipe):
    report = finetune.validate(make_recipe(), ["train.lr=3e-5"])
    assert report.labels == LABELS and report.splits["train"].rows == 16
    assert report.splits["train"].counts == {"food": 6, "sports": 5, "tech": 5}
    assert "rows" in report.table()


def test_a_builtin_recipe_name_resolves_as_the_cli_lists_it():
    from finetune.api import resolve_recipe

    recipe = resolve_recipe("text/minilm-bbc-news", {"train.epochs": 1})
    assert recipe.backbone.name == "minilm-l6" and recipe.train.epochs == 1
    assert recipe.output.dir is not None


def errors(capfd, args: list, call) -> tuple[str, str]:
    """(the CLI's error line, `finetune: error: ` and the API's message as one line)."""
    line = one_error_line(call_main(capfd, *args))
    with pytest.raises(finetune.FinetuneError) as raised:
        call()
    return line, "finetune: error: " + " ".join(str(raised.value).split())


def test_bad_input_raises_finetune_error_with_the_clis_line(make_recipe, tmp_path, capfd):
    bad_key = write_recipe(tmp_path / "bad-key.yaml", make_recipe(**{"train.epoch": 3}))
    line, message = errors(capfd, ["run", bad_key], lambda: finetune.run(bad_key))
    assert line == message and "train.epoch" in line
    bad_column = write_recipe(tmp_path / "bad-column.yaml", make_recipe())
    line, message = errors(capfd, ["validate", bad_column, "data.text_column=body"],
                           lambda: finetune.validate(bad_column, {"data.text_column": "body"}))
    assert line == message and "body" in line
    line, message = errors(capfd, ["run", "text/minilm-bbc-new"], lambda: finetune.run("text/minilm-bbc-new"))
    assert line == message and "text/minilm-bbc-news" in line  # the did-you-mean of a built-in name
    with pytest.raises(finetune.FinetuneError, match="train.epoch"):
        finetune.run(make_recipe(**{"train.epoch": 3}))  # a dict recipe: the same check
    with pytest.raises(finetune.FinetuneError, match="overrides"):
        finetune.validate(make_recipe(), 3)
    with pytest.raises(finetune.FinetuneError, match="format"):
        finetune.export(tmp_path, format="tflite")
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_the_api_names_stay_functions_whatever_is_imported():
    import importlib
    import pkgutil

    package = Path(finetune.__file__).parent
    clashing = [name for name in API if (package / f"{name}.py").exists() or (package / name).is_dir()]
    assert clashing == []  # a submodule of the same name would replace the function at its first import
    for module in pkgutil.walk_packages([str(package)], "finetune."):
        if module.name == "finetune.__main__":  # it runs the CLI
            continue
        try:
            importlib.import_module(module.name)
        except ImportError:  # an optional extra not installed here
            pass
    from finetune import api

    assert all(getattr(finetune, name) is getattr(api, name) for name in API)
    assert finetune.Run is api.Run and finetune.FinetuneError.__module__ == "finetune.errors"
