"""The real CLI in subprocesses: ls, cp, validate, run, the exported model without finetune, and bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import (
    LABELS,
    REPO,
    call_main,
    one_error_line,
    recipe_dict,
    run_cli,
    run_without_finetune,
    write_csv,
    write_recipe,
)

from finetune.errors import FinetuneError

BUILTIN = "text/minilm-bbc-news"


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under folder: (mtime_ns, content hash)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------------------------
# ls, cp, validate


def test_ls_lists_the_builtin_recipes():
    result = run_cli("ls")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith(BUILTIN))
    assert "text-classification" in line and "minilm-l6" in line and "bbc-news" in line


def test_cp_copies_and_refuses_to_overwrite(tmp_path):
    source = (REPO / "recipes" / f"{BUILTIN}.yaml").read_text()
    target = tmp_path / "my.yaml"
    assert run_cli("cp", BUILTIN, target).returncode == 0
    assert target.read_text() == source

    target.write_text("# my edits\n")
    line = one_error_line(run_cli("cp", BUILTIN, target))
    assert str(target) in line and "--force" in line
    assert target.read_text() == "# my edits\n"

    assert run_cli("cp", BUILTIN, target, "--force").returncode == 0
    assert target.read_text() == source

    assert run_cli("cp", BUILTIN, tmp_path).returncode == 0  # into a folder: keeps the recipe's file name
    assert (tmp_path / "minilm-bbc-news.yaml").read_text() == source


def test_validate_prints_the_resolved_recipe(tiny_bert, tiny_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_bert, tiny_data, tmp_path / "out"))
    result = run_cli("validate", recipe, "train.lr=3e-5", "head.dropout=0.2")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["lr"] == 3e-5 and isinstance(resolved["train"]["lr"], float)  # 3e-5 is a number
    assert resolved["head"]["dropout"] == 0.2
    assert resolved["eval"]["metrics"] == ["accuracy", "f1_macro"]  # defaults filled in from the schema
    assert resolved["eval"]["select_best"] == "accuracy"
    assert resolved["train"]["weight_decay"] == 0.01
    assert not (tmp_path / "out").exists()  # validate trains nothing and writes nothing


# slow (the default suite's time): reads and tokenises the whole zoo set; validate itself is tested on tiny recipes
@pytest.mark.slow
def test_validate_builtin_recipe_by_name():
    result = run_cli("validate", BUILTIN)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["backbone"]["name"] == "minilm-l6"


# ---------------------------------------------------------------------------------------------------------------
# the CLI's edges: pipes, --json, --debug anywhere, help, --version, cat


def test_ls_into_a_reader_that_has_gone_is_quiet_and_exits_0():
    import os
    import subprocess
    import sys

    from conftest import subprocess_env

    read, write = os.pipe()
    os.close(read)  # as `finetune ls | head -0`: the first write meets a closed pipe
    try:
        result = subprocess.run([sys.executable, "-m", "finetune", "ls"], stdout=write, stderr=subprocess.PIPE,
                                env=subprocess_env(), text=True, timeout=120, check=False)
    finally:
        os.close(write)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_ls_json_lists_the_recipes_with_what_they_need(capfd):
    result = call_main(capfd, "ls", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows[BUILTIN]["task"] == "text-classification" and rows[BUILTIN]["data"] == "bbc-news"
    assert rows[BUILTIN]["needs"] == []  # zoo backbone and zoo data: offline on a plain install
    assert rows["vision/efficientnet-lite0-fashion-mnist"]["needs"] == ["apt:dataset-fashion-mnist"]
    assert rows["text/minilm-go-emotions-multilabel"]["needs"] == ["network"]  # a hub: data set
    assert rows["text/minilm-conll-ner"]["needs"] == ["files"]  # its data keys name your CoNLL files
    table = call_main(capfd, "ls").stdout.splitlines()
    assert table[0].split()[-1] == "needs"
    assert next(line for line in table if line.startswith("vision/efficientnet-lite0-fashion-mnist ")).endswith(
        "apt:dataset-fashion-mnist"
    )


def test_cat_prints_a_builtin_recipe_as_it_is(capfd):
    result = call_main(capfd, "cat", BUILTIN)
    assert result.returncode == 0 and result.stdout == (REPO / "recipes" / f"{BUILTIN}.yaml").read_text()
    assert "finetune ls" in one_error_line(call_main(capfd, "cat", "text/no-such-recipe"))


def test_debug_is_accepted_after_every_verb(capfd, tmp_path):
    from finetune.cli import build_parser

    minimal = {
        "ls": [], "cat": [BUILTIN], "cp": [BUILTIN, "x.yaml"], "validate": [BUILTIN], "run": [BUILTIN],
        "eval": ["runs/x", "--data", "t.csv"], "predict": ["runs/x", "hello"], "push": ["runs/x"],
        "cache": ["ls"], "sweep": [BUILTIN], "export": ["runs/x"], "serve": ["runs/x"], "explain": ["runs/x"],
        "report": ["runs"], "shrink": ["runs/x"],
    }
    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    for verb in verbs:  # a verb added later without --debug fails here
        args = parser.parse_args([verb, *minimal.get(verb, []), "--debug"])
        assert args.debug is True, verb
    with pytest.raises(FinetuneError):  # --debug after the verb: the error is raised, not turned into a line
        call_main(capfd, "cat", "text/no-such-recipe", "--debug")


def test_run_and_validate_without_a_recipe_say_what_to_give(capfd):
    for verb in ("run", "validate"):
        line = one_error_line(call_main(capfd, verb))
        assert f"finetune {verb} text/minilm-bbc-news" in line and "finetune ls" in line, line


def test_validate_checks_the_schedule_and_its_arguments(tiny_bert, tiny_data, tmp_path, capfd):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_bert, tiny_data, tmp_path / "out"))
    line = one_error_line(call_main(capfd, "validate", recipe, "train.scheduler=warmup_stable_decay"))
    assert "train.scheduler_args.num_decay_steps" in line
    line = one_error_line(call_main(capfd, "validate", recipe, "train.scheduler_args={min_lr: 0.1}"))
    assert "train.scheduler_args.min_lr: not an argument of the constant schedule" in line  # the recipe's constant
    ok = call_main(capfd, "validate", recipe, "train.scheduler=cosine_with_min_lr",
                   "train.scheduler_args={min_lr_rate: 0.1}")
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["train"]["scheduler_args"] == {"min_lr_rate": 0.1}


def test_every_verb_has_help_and_an_example():
    from finetune.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    for name, verb in verbs.items():
        text = verb.format_help()
        assert "examples:" in text and f"finetune {name}" in text.split("examples:")[1], name
    assert "--resume" not in verbs["validate"].format_help()  # only run resumes
    assert "--resume" in verbs["run"].format_help()
    for name in ("eval", "predict"):
        assert "(default: 32)" in " ".join(verbs[name].format_help().split()), name
    listed = parser.format_help()
    assert "train: fine-tune" in listed  # run's one line says more than "train"


def test_version_names_the_libraries_and_the_device():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names[:2] == ["finetune", "python"]
    assert {"torch", "transformers", "timm", "accelerate", "peft", "device"} <= set(names)
    import torch

    assert f"torch {torch.__version__}" in result.stdout


def test_progress_in_a_log_is_plain_lines_not_carriage_returns():
    import io

    from finetune.progress import PlainProgress, epoch_progress

    log = io.StringIO()  # not a terminal
    bar = epoch_progress(range(5), "epoch 1/2", disable=False, initial=0, total=5, stream=log)
    assert isinstance(bar, PlainProgress)
    bar.every = 0.0  # a line after every batch, as a long epoch would after every 30 seconds
    for _ in bar:
        bar.set_postfix(loss="0.5000")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 5
    assert lines[-1].startswith("epoch 1/2: 5/5 batches") and lines[-1].endswith("loss 0.5000")
    quiet = io.StringIO()
    assert list(epoch_progress(range(3), "e", disable=False, initial=1, total=4, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue().splitlines() == [quiet.getvalue().splitlines()[0]]  # a short epoch: one line
    assert quiet.getvalue().startswith("e: 4/4 batches")  # counted on from a resumed batch


def test_a_pass_that_is_not_an_epoch_speaks_in_a_log_only_when_it_runs_long():
    import io

    from finetune import progress

    log = io.StringIO()
    assert list(progress.pass_progress(range(4), "validation", 4, stream=log)) == [0, 1, 2, 3]
    assert log.getvalue() == ""  # a short pass: nothing, where an epoch says its one line
    bar = progress.pass_progress(range(4), "test", 4, stream=log)
    bar.every = 0.0  # as a pass that runs past 30 seconds
    assert list(bar) == [0, 1, 2, 3]
    assert log.getvalue().splitlines()[-1].startswith("test: 4/4 batches")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    assert list(progress.pass_progress(range(3), "features", 3, stream=screen)) == [0, 1, 2]
    assert "\r" in screen.getvalue() and "features" in screen.getvalue()  # a bar, cleared when done (leave=False)
    assert list(progress.pass_progress(range(3), "x", 3, disable=True, stream=log)) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------
# a full run from a copied built-in recipe, with dotted overrides only


def tiny_overrides(tiny_bert, tiny_data, out: Path) -> list[str]:
    return [
        f"backbone.name={tiny_bert}",
        f"data.train={tiny_data['train']}",
        f"data.validation={tiny_data['validation']}",
        f"data.test={tiny_data['test']}",
        "data.text_column=sentence",
        "data.label_column=topic",
        "data.max_samples=null",
        "data.max_length=16",
        "train.epochs=2",
        "train.batch_size=8",
        "train.lr=1e-3",
        f"output.dir={out}",
    ]


@pytest.fixture(scope="module")
def cli_run(tiny_bert, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-run")
    recipe = root / "my.yaml"
    assert run_cli("cp", BUILTIN, recipe).returncode == 0
    out = root / "run"
    result = run_cli("run", recipe, *tiny_overrides(tiny_bert, tiny_data, out))
    return recipe, out, result


def test_run_exits_0_and_writes_the_run_folder(cli_run, tiny_bert):
    _, out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["backbone"]["name"] == str(tiny_bert)
    assert config["data"]["text_column"] == "sentence" and config["data"]["max_samples"] is None
    assert config["train"]["lr"] == 1e-3 and config["train"]["head_lr"] == 1e-3  # head_lr kept from the recipe
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and "test" in metrics
    assert "\r" not in result.stderr and "epoch 2/2: 2/2 batches" in result.stderr  # stderr is a pipe: no bar frames
    assert json.loads((out / "split.json").read_text())["labels"] == LABELS
    assert "task: text-classification" in result.stdout  # the resolved recipe is printed


PIPELINE_WITHOUT_FINETUNE = """
import json, sys
sys.modules["finetune"] = None  # `import finetune` now fails: the folder must stand alone
from transformers import pipeline
classify = pipeline("text-classification", model=sys.argv[1])
top = classify(["the goal today news", "a chip of data story"])
every = classify("very rice and soup", top_k=None)
print(json.dumps({"top": top, "every": every}))
"""


def test_exported_model_loads_in_a_pipeline_without_finetune(cli_run, tmp_path):
    _, out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    answer = run_without_finetune(PIPELINE_WITHOUT_FINETUNE, out / "model", cwd=tmp_path)
    assert all(row["label"] in LABELS for row in answer["top"])
    assert sorted(row["label"] for row in answer["every"]) == LABELS
    assert sum(row["score"] for row in answer["every"]) == pytest.approx(1.0, abs=1e-4)


def test_second_run_to_the_same_folder_is_refused_and_changes_nothing(cli_run, tiny_bert, tiny_data):
    recipe, out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    before = snapshot(out)
    line = one_error_line(run_cli("run", recipe, *tiny_overrides(tiny_bert, tiny_data, out)))
    assert "output.dir" in line and "--overwrite" in line
    assert snapshot(out) == before


# slow (the default suite's time): a second whole CLI run; refusing to overwrite is tested by default
@pytest.mark.slow
def test_overwrite_replaces_the_run(cli_run, tiny_bert, tiny_data, tmp_path):
    recipe, out, result = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "stale.txt").write_text("from an older run")
    old_metrics = (copy / "metrics.json").stat().st_mtime_ns
    rerun = run_cli("run", recipe, *tiny_overrides(tiny_bert, tiny_data, copy), "train.epochs=1", "--overwrite")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not (copy / "stale.txt").exists()
    assert (copy / "metrics.json").stat().st_mtime_ns != old_metrics
    assert len(json.loads((copy / "metrics.json").read_text())["epochs"]) == 1
    assert (copy / "model" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line on stderr naming the culprit, exit 2. Every case runs through `finetune.cli.main` in this process
# (a subprocess pays seconds for importing torch); a few also run as real subprocesses, started together.


def bad_input_cases(tiny_bert, tiny_data, root: Path) -> dict[str, tuple[list, str, Path]]:
    """name -> (CLI arguments, text the error line must contain, the case's output.dir)."""
    cases = {}

    def recipe(name: str, **dotted) -> tuple[Path, Path]:
        out = root / f"out-{name}"
        return write_recipe(root / f"{name}.yaml", recipe_dict(tiny_bert, tiny_data, out, **dotted)), out

    path, out = recipe("unknown-key", **{"train.epoch": 3})
    cases["unknown-key"] = (["run", path], "train.epoch", out)
    path, out = recipe("missing-file", **{"data.train": str(root / "missing.csv")})
    cases["missing-file"] = (["run", path], "missing.csv", out)
    path, out = recipe("missing-column", **{"data.text_column": "body"})
    cases["missing-column"] = (["run", path], "body", out)
    unseen = write_csv(
        root / "unseen.csv", ["sentence", "topic"], [("the goal today news", "sports"), ("a news story of", "weather")]
    )
    path, out = recipe("unseen-label", **{"data.validation": str(unseen)})
    cases["unseen-label"] = (["run", path], "weather", out)

    malformed = root / "malformed.yaml"
    malformed.write_text("task: text-classification\nbackbone: [unclosed\n")
    cases["malformed-yaml"] = (["run", malformed], "malformed.yaml", root / "unused")
    tagged = root / "tagged.yaml"
    tagged.write_text(f'task: !!python/object/apply:os.system ["touch {root / "pwned"}"]\n')
    cases["python-tag"] = (["run", tagged], "tagged.yaml", root / "unused")

    path, out = recipe("override")
    cases["override-syntax"] = (["run", path, "train.lr"], "train.lr", out)
    cases["negative-lr"] = (["run", path, "train.lr=-1e-5"], "train.lr", out)
    cases["unknown-recipe"] = (["run", "text/minilm-bbc-new"], "text/minilm-bbc-news", root / "unused")
    cases["validate-missing-file"] = (["validate", root / "missing-file.yaml"], "missing.csv", root / "unused")
    return cases


@pytest.fixture
def bad_cases(tiny_bert, tiny_data, tmp_path):
    return tmp_path, bad_input_cases(tiny_bert, tiny_data, tmp_path)


CASES = [
    "unknown-key",
    "missing-file",
    "missing-column",
    "unseen-label",
    "malformed-yaml",
    "python-tag",
    "override-syntax",
    "negative-lr",
    "unknown-recipe",
    "validate-missing-file",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_culprit(bad_cases, capfd, case):
    root, cases = bad_cases
    args, culprit, _ = cases[case]
    line = one_error_line(call_main(capfd, *args))
    assert line.startswith("finetune: error: ")
    assert culprit in line, line
    assert not (root / "pwned").exists()  # a python tag in a recipe never runs


def test_recipe_errors_leave_no_run_folder(bad_cases, capfd):
    _, cases = bad_cases
    for case in ("unknown-key", "override-syntax", "negative-lr"):
        args, _, out = cases[case]
        assert call_main(capfd, *args).returncode == 2
        assert not out.exists(), case


@pytest.mark.parametrize("case", ["missing-file", "missing-column", "unseen-label"])
def test_data_errors_leave_no_run_folder(bad_cases, capfd, case):
    _, cases = bad_cases
    args, _, out = cases[case]
    assert call_main(capfd, *args).returncode == 2
    assert not out.exists()


def test_failed_overwrite_keeps_the_previous_run(bad_cases, capfd):
    _, cases = bad_cases
    args, culprit, out = cases["unseen-label"]
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # stands for a finished earlier run
    result = call_main(capfd, *args, "--overwrite")
    assert culprit in one_error_line(result)
    assert (out / "metrics.json").read_text() == "{}"


def test_debug_raises_instead_of_one_line(bad_cases, capfd):
    from finetune.errors import FinetuneError

    args = bad_cases[1]["negative-lr"][0]
    with pytest.raises(FinetuneError, match="train.lr"):
        call_main(capfd, *args, "--debug")


@pytest.fixture(scope="module")
def bad_inputs_in_subprocesses(tiny_bert, tiny_data, tmp_path_factory):
    """A recipe error, a data error and --debug, as real processes (library output on stderr would show here)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    cases = bad_input_cases(tiny_bert, tiny_data, root)
    jobs = {name: cases[name][0] for name in ("negative-lr", "unseen-label")}
    jobs["debug"] = ["--debug", *cases["negative-lr"][0]]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, args in jobs.items()}
        return cases, {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", ["negative-lr", "unseen-label"])
def test_bad_input_in_a_real_process(bad_inputs_in_subprocesses, case):
    cases, results = bad_inputs_in_subprocesses
    line = one_error_line(results[case])
    assert cases[case][1] in line, line


def test_debug_shows_the_traceback(bad_inputs_in_subprocesses):
    _, results = bad_inputs_in_subprocesses
    result = results["debug"]
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "FinetuneError" in result.stderr and "train.lr" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# the real quickstart


@pytest.mark.slow
def test_quickstart_recipe_on_a_few_bbc_articles(tmp_path):
    out = tmp_path / "quick"
    result = run_cli(
        "run",
        BUILTIN,
        "data.max_samples=40",
        "data.max_length=64",
        "train.epochs=1",
        "train.batch_size=8",
        f"output.dir={out}",
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"accuracy", "f1_macro"}
    config = json.loads((out / "model" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["business", "entertainment", "politics", "sports", "tech"]
