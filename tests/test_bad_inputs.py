"""The bad-input matrix: malformed recipes, data files, images and output folders, through `finetune run` and
`finetune validate`. Each case must exit 2 with exactly one stderr line naming the culprit, no traceback, and leave an
existing run folder byte-for-byte as it was. Cases run in this process through `finetune.cli.main` (a subprocess pays
seconds to import torch); a few also run as real processes, started together."""

from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from conftest import call_main, one_error_line, recipe_dict, run_cli, write_csv, write_recipe
from PIL import Image

BOTH = ("run", "validate")


@dataclass
class Case:
    """What one malformed input looks like: the recipe file and overrides, and what the error line must name."""

    build: Callable  # (World) -> (recipe path, overrides)
    culprits: tuple[str, ...]  # substrings of the error line (`{root}` is the case folder)
    verbs: tuple[str, ...] = BOTH
    xfail: dict[str, str] = field(default_factory=dict)  # verb -> reason: a fix needed in a file this suite can't edit
    overwrite: bool = True  # run with --overwrite, so only the bad input can stop it from replacing the old run


@dataclass
class World:
    root: Path  # this case's folder
    model: Path  # the tiny BERT
    data: dict[str, Path]  # tiny train/validation/test CSVs (columns sentence, topic)
    out: Path  # an existing run folder the case's recipe points at

    def text(self, name: str = "recipe", **dotted) -> Path:
        return write_recipe(self.root / f"{name}.yaml", recipe_dict(self.model, self.data, self.out, **dotted))

    def image(self, name: str = "recipe", **data) -> Path:
        raw = recipe_dict(self.model, self.data, self.out)
        raw.update(task="image-classification", backbone={"name": "test_efficientnet", "pretrained": False})
        raw["data"] = {key: str(value) for key, value in data.items()}
        return write_recipe(self.root / f"{name}.yaml", raw)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def csv(self, name: str, rows: list, header=("sentence", "topic")) -> Path:
        return write_csv(self.root / name, list(header), rows)

    def images(self, name: str, counts: dict[str, int]) -> Path:
        folder = self.root / name
        for c, (label, count) in enumerate(counts.items()):
            (folder / label).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.random.RandomState(100 * c + i).randint(0, 256, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / label / f"{i}.png")
        return folder


ROWS = [("the goal today news", "sports"), ("a cake of the", "food"), ("chip code and data", "tech")] * 2


def _python_tag(w: World):
    path = w.file("tagged.yaml", f'task: !!python/object/apply:os.system ["touch {w.root / "pwned"}"]\n')
    return path, []


def _tab_indented(w: World):
    return w.file("tabs.yaml", "task: text-classification\nbackbone:\n\tname: minilm-l6\n"), []


def _unseen_label(w: World):
    validation = w.csv("unseen.csv", [("the goal today news", "sports"), ("a news story of", "weather")])
    return w.text(**{"data.validation": str(validation)}), []


def _directory_as_data_file(w: World):
    (w.root / "folder.csv").mkdir()
    return w.text(**{"data.test": str(w.root / "folder.csv")}), []


def _bad_image(name: str, content: bytes):
    def build(w: World):
        train = w.images("pictures", {"a": 2, "b": 2})
        w.file(f"pictures/b/{name}", content)
        return w.image(train=train), []

    return build


def _directory_as_image(w: World):
    table = w.file("table.csv", "image,label\npictures/a/0.png,a\npictures/b/0.png,b\nsub.png,b\n")
    w.images("pictures", {"a": 1, "b": 1})
    (w.root / "sub.png").mkdir()
    return w.image(train=table, validation=table), []


def _unreadable_parent(w: World):
    locked = w.root / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return w.text(**{"output.dir": str(locked / "run")}), []


CASES: dict[str, Case] = {
    # --- the recipe itself
    "unknown-key": Case(lambda w: (w.text(**{"train.epoch": 3}), []), ("train.epoch", "did you mean 'epochs'")),
    "wrong-type": Case(lambda w: (w.text(**{"train.batch_size": "eight"}), []), ("train.batch_size", "'eight'")),
    "negative-lr": Case(lambda w: (w.text(), ["train.lr=-3e-5"]), ("train.lr",)),
    "batch-size-0": Case(lambda w: (w.text(), ["train.batch_size=0"]), ("train.batch_size",)),
    "epochs-negative": Case(lambda w: (w.text(**{"train.epochs": -1}), []), ("train.epochs",)),
    "val-fraction-1.5": Case(lambda w: (w.text(**{"data.val_fraction": 1.5}), []), ("data.val_fraction", "1.5")),
    "select-best-not-a-metric": Case(
        lambda w: (w.text(**{"eval.metrics": ["accuracy"], "eval.select_best": "f1_macro"}), []),
        ("eval.select_best", "f1_macro"),
    ),
    "unknown-metric": Case(lambda w: (w.text(**{"eval.metrics": ["acuracy"]}), []), ("eval.metrics", "accuracy")),
    "image-size-negative": Case(lambda w: (w.text(**{"data.image_size": -32}), []), ("data.image_size",)),
    "max-length-1": Case(lambda w: (w.text(**{"data.max_length": 1}), []), ("data.max_length",)),
    "unknown-task": Case(lambda w: (w.text(task="text-clasification"), []), ("task", "text-classification")),
    "scheduler-typo": Case(lambda w: (w.text(), ["train.scheduler=cosin"]), ("train.scheduler", "cosine")),
    "section-not-a-mapping": Case(lambda w: (w.text(train=[1, 2]), []), ("train", "mapping")),
    "recipe-is-a-list": Case(lambda w: (w.file("list.yaml", "- task: text-classification\n"), []), ("list.yaml",)),
    "tab-indented-yaml": Case(_tab_indented, ("tabs.yaml", "line 3")),
    "python-tag": Case(_python_tag, ("tagged.yaml",)),
    "empty-recipe": Case(lambda w: (w.file("empty.yaml", ""), []), ("empty.yaml", "task")),
    "recipe-is-a-directory": Case(lambda w: (w.root, []), (".", "directory")),
    "override-without-value": Case(lambda w: (w.text(), ["train.lr"]), ("train.lr", "key=value")),
    "unknown-backbone-path": Case(
        lambda w: (w.text(**{"backbone.name": str(w.root / "no-such-model")}), []),
        ("backbone.name", "no-such-model"),
    ),
    "lora-bad-target-module": Case(
        lambda w: (w.text(lora={"r": 4, "target_modules": ["no_such_module"]}), []),
        ("no_such_module",),
        verbs=("run",),
    ),
    # --- data files
    "missing-file": Case(lambda w: (w.text(**{"data.train": str(w.root / "absent.csv")}), []), ("absent.csv",)),
    "empty-file": Case(lambda w: (w.text(**{"data.train": str(w.file("empty.csv", ""))}), []), ("empty.csv", "empty")),
    "header-only": Case(
        lambda w: (w.text(**{"data.validation": str(w.file("header.csv", "sentence,topic\n"))}), []),
        ("header.csv", "no data rows"),
    ),
    "blank-lines-only": Case(
        lambda w: (w.text(**{"data.train": str(w.file("blank.csv", "\n \n\n"))}), []), ("blank.csv", "empty")
    ),
    "wrong-delimiter": Case(
        lambda w: (w.text(**{"data.train": str(w.file("semi.csv", "sentence;topic\na cake;food\na goal;sports\n"))}),
                   []),
        ("semi.csv", "delimiter", "semicolon"),
    ),
    "tsv-with-commas": Case(
        lambda w: (w.text(**{"data.train": str(w.file("commas.tsv", "sentence,topic\na cake,food\na goal,sports\n"))}),
                   []),
        ("commas.tsv", "delimiter"),
    ),
    "unquoted-comma": Case(
        lambda w: (w.text(**{"data.train": str(w.file("comma.csv", "sentence,topic\na,food\nbread, soup,food\n"))}),
                   []),
        ("comma.csv", "line 3"),
    ),
    "unclosed-quote": Case(
        lambda w: (w.text(**{"data.train": str(w.file("quote.csv", 'sentence,topic\na,food\n"b,tech\n'))}), []),
        ("quote.csv", "quote"),
    ),
    "broken-jsonl": Case(
        lambda w: (w.text(**{"data.train": str(w.file("broken.jsonl", '{"sentence": "a", "topic": "x"}\n{oops\n'))}),
                   []),
        ("broken.jsonl",),
    ),
    "not-parquet": Case(
        lambda w: (w.text(**{"data.train": str(w.file("fake.parquet", "sentence,topic\n"))}), []), ("fake.parquet",)
    ),
    "unknown-extension": Case(
        lambda w: (w.text(**{"data.train": str(w.file("data.xlsx", "PK\x03\x04"))}), []), ("data.xlsx", "extension")
    ),
    "directory-as-data-file": Case(_directory_as_data_file, ("folder.csv", "directory")),
    "missing-column": Case(lambda w: (w.text(**{"data.text_column": "sentense"}), []), ("sentense", "sentence")),
    "same-text-and-label-column": Case(lambda w: (w.text(**{"data.label_column": "sentence"}), []), ("sentence",)),
    "unseen-label": Case(_unseen_label, ("weather", "unseen.csv")),
    "missing-label": Case(
        lambda w: (w.text(**{"data.train": str(w.csv("nolabel.csv", ROWS + [("a cake", "")]))}), []),
        ("nolabel.csv", "line 8", "missing label"),
    ),
    "nan-regression-target": Case(
        lambda w: (w.text(**{"head.problem": "regression", "data.train": str(w.csv("nan.csv", [
            ("a cake", 1.5), ("a goal", "nan"), ("a chip", 2.0)]))}), []),
        ("nan.csv", "line 3"),
    ),
    "text-regression-target": Case(
        lambda w: (w.text(**{"head.problem": "regression", "data.train": str(w.csv("words.csv", [
            ("a cake", 1.5), ("a goal", "high"), ("a chip", 2.0)]))}), []),
        ("words.csv", "'high'"),
    ),
    "mixed-label-types": Case(
        lambda w: (w.text(**{"data.train": str(w.file("mixed.jsonl", "".join(
            f'{{"sentence": "{t}", "topic": {y}}}\n' for t, y in [("a", '"food"'), ("b", '"tech"'), ("c", "1")])))}),
            []),
        ("mixed.jsonl", "line 3", "mixed label types"),
    ),
    "one-class-only": Case(
        lambda w: (w.text(**{"data.train": str(w.csv("one.csv", [(t, "food") for t, _ in ROWS]))}), []),
        ("one.csv", "only 1 label"),
    ),
    "non-utf8-text": Case(
        lambda w: (w.text(**{
            "data.train": str(w.file("latin1.csv", "sentence,topic\ncaf\xe9,food\n".encode("latin-1")))
        }), []),
        ("latin1.csv", "UTF-8", "line 2"),
    ),
    "numbers-as-text": Case(
        lambda w: (w.text(**{"data.train": str(w.csv("ids.csv", [(i, y) for i, (_, y) in enumerate(ROWS)]))}), []),
        ("ids.csv", "data.text_column"),
    ),
    "all-texts-empty": Case(
        lambda w: (w.text(**{"data.validation": str(w.csv("blank-texts.csv", [("", "food"), ("  ", "tech")]))}), []),
        ("blank-texts.csv", "empty"),
    ),
    "zoo-name-typo": Case(lambda w: (w.text(**{"data.train": "bbc-new"}), []), ("bbc-new", "bbc-news")),
    "utf16-text": Case(
        lambda w: (w.text(**{"data.train": str(w.file("excel.csv", "sentence,topic\na,food\n".encode("utf-16")))}), []),
        ("excel.csv", "UTF-16"),
    ),
    "json-of-nulls": Case(
        lambda w: (w.text(**{"data.train": str(w.file("nulls.jsonl", "null\nnull\n"))}), []), ("nulls.jsonl", "null")
    ),
    "list-labels-single-label": Case(
        lambda w: (w.text(**{"data.train": str(w.file("lists.jsonl", "".join(
            f'{{"sentence": "{t}", "topic": ["food", "tech"]}}\n' for t in "abc")))}), []),
        ("lists.jsonl", "line 1", "multi_label"),
    ),
    "hub-data-set-offline": Case(lambda w: (w.text(**{"data.train": "hub:nobody/no-such-set"}), []), ("hub:nobody",)),
    "max-length-beyond-backbone": Case(  # the tiny BERT has 64 positions
        lambda w: (w.text(**{
            "data.max_length": 128, "data.test": str(w.csv("long.csv", [(" ".join(["news"] * 100), "food")]))
        }), []),
        ("data.max_length", "64"),
    ),
    # --- images
    "corrupt-image": Case(_bad_image("bad.png", b"\x89PNG\r\n\x1a\nnot really"), ("bad.png", "not a readable image")),
    "zero-byte-image": Case(_bad_image("empty.jpg", b""), ("empty.jpg", "0 bytes")),
    "text-file-named-png": Case(_bad_image("note.png", b"hello"), ("note.png", "not a readable image")),
    "directory-as-image": Case(_directory_as_image, ("table.csv", "line 4", "sub.png", "directory")),
    "image-folder-without-classes": Case(
        lambda w: (w.image(train=w.file("flat/x.png", b"").parent), []), ("flat", "subfolder")
    ),
    "image-csv-missing-column": Case(
        lambda w: (w.image(train=w.file("paths.csv", "path,label\na.png,x\n")), []), ("paths.csv", "data.image_column")
    ),
    "one-image-as-data": Case(
        lambda w: (w.image(train=w.file("single.png", b"\x89PNG")), []), ("single.png", "one image")
    ),
    "bad-augment-policy": Case(
        lambda w: (w.image(train=w.images("pictures", {"a": 2, "b": 2})), ["augment.auto_augment=randaugment-strong"]),
        ("augment.auto_augment", "randaugment-strong"),
    ),
    "mixup-with-an-odd-batch": Case(
        lambda w: (w.image(train=w.images("pictures", {"a": 2, "b": 2})), ["augment.mixup=0.2", "train.batch_size=7"]),
        ("train.batch_size", "even"),
    ),
    # --- the run folder
    "output-dir-is-a-file": Case(
        lambda w: (w.text(**{"output.dir": str(w.file("taken", "not a folder"))}), []),
        ("output.dir", "taken"),
    ),
    "output-dir-under-a-file": Case(
        lambda w: (w.text(**{"output.dir": str(w.file("plain", "x") / "run")}), []),
        ("output.dir", "plain"),
    ),
    "existing-run-without-overwrite": Case(
        lambda w: (w.text(), []), ("output.dir", "--overwrite"), verbs=("run",), overwrite=False
    ),
    "unwritable-output-dir": Case(
        _unreadable_parent, ("output.dir", "locked")
    ),
}

# real processes: a recipe error, a data error, an image error (library output on stderr would show only here)
SUBPROCESS_CASES = [("python-tag", "run"), ("non-utf8-text", "validate"), ("zero-byte-image", "validate")]


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under folder, with a content hash for files."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def previous_run(out: Path) -> dict[str, str]:
    """A finished run's folder (as far as the matrix cares): files that must survive every bad input."""
    (out / "model").mkdir(parents=True)
    (out / "config.yaml").write_text("task: text-classification\n")
    (out / "metrics.json").write_text('{"test": {"accuracy": 0.9}}\n')
    (out / "model" / "model.safetensors").write_bytes(os.urandom(256))
    return snapshot(out)


def argv_of(name: str, verb: str, world: World) -> list[str]:
    case = CASES[name]
    recipe, overrides = case.build(world)
    flags = ["--overwrite"] if verb == "run" and case.overwrite else []
    return [verb, str(recipe), *overrides, *flags]


def make_world(root: Path, tiny_bert: Path, tiny_data: dict[str, Path]) -> World:
    root.mkdir(parents=True, exist_ok=True)
    world = World(root, tiny_bert, tiny_data, root / "previous-run")
    return world


def check(result, case: Case, world: World, before: dict[str, str]) -> None:
    line = one_error_line(result)
    assert line.startswith("finetune: error: "), line
    for culprit in case.culprits:
        assert culprit.format(root=world.root) in line, line
    assert snapshot(world.out) == before, "the existing run folder changed"
    assert not (world.root / "pwned").exists()  # a python tag in a recipe never runs


def params():
    for name, case in CASES.items():
        for verb in case.verbs:
            marks = [pytest.mark.xfail(strict=True, reason=case.xfail[verb])] if verb in case.xfail else []
            if name == "unwritable-output-dir":
                marks.append(pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere"))
            yield pytest.param(name, verb, id=f"{name}-{verb}", marks=marks)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets-cache")


def schema_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of the recipe schema, nested sections (optional ones too) included: read from the schema, so a
    key added later is covered without an edit here."""
    import dataclasses
    import typing

    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        union = typing.get_origin(hint) is typing.Union
        options = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        sections = [a for a in options if dataclasses.is_dataclass(a)]
        if len(options) == 1 and sections:
            keys += schema_keys(sections[0], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


REQUIRED_IN_OPTIONAL_SECTIONS = {"distill": {"distill.teacher": "runs/teacher"}}


def test_a_wrong_value_for_any_recipe_key_is_reported_with_that_key():
    """[[]] (a list holding a list) is no valid value for any key: the one problem reported must name the key."""
    from conftest import set_dotted

    from finetune.errors import FinetuneError
    from finetune.recipe import Recipe, from_dict

    keys = schema_keys(Recipe)
    assert {"train.lr", "data.train", "lora.r", "train.early_stopping.patience", "hub.private"} <= set(keys)
    for key in keys:
        raw = {"task": "text-classification", "backbone": {"name": "b"}, "data": {"train": "t.csv"}}
        section = key.rsplit(".", 1)[0]
        if key.count(".") == 2:  # inside an optional section: the section is there, with one bad key
            set_dotted(raw, section, {})
        for required in REQUIRED_IN_OPTIONAL_SECTIONS.get(section, {}).items():
            set_dotted(raw, *required)  # a section with a required key of its own (distill.teacher) gets it
        set_dotted(raw, key, [[]])
        with pytest.raises(FinetuneError) as error:
            from_dict(raw, source="r.yaml")
        message = str(error.value)
        assert message.startswith("r.yaml: 1 problem: ") and key in message, (key, message)


@pytest.mark.parametrize("name, verb", list(params()))
def test_bad_input_exits_2_with_one_line_and_leaves_the_old_run(name, verb, tiny_bert, tiny_data, tmp_path, capfd):
    world = make_world(tmp_path, tiny_bert, tiny_data)
    before = previous_run(world.out)
    try:
        result = call_main(capfd, *argv_of(name, verb, world))
    finally:
        for path in tmp_path.rglob("*"):  # a locked folder must not stop pytest from cleaning up
            if path.is_dir():
                path.chmod(0o755)
    check(result, CASES[name], world, before)


@pytest.fixture(scope="module")
def in_subprocesses(tiny_bert, tiny_data, tmp_path_factory):
    jobs = {}
    for name, verb in SUBPROCESS_CASES:
        world = make_world(tmp_path_factory.mktemp(name), tiny_bert, tiny_data)
        jobs[name] = (world, previous_run(world.out), argv_of(name, verb, world))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(run_cli, *argv) for name, (_, _, argv) in jobs.items()}
        return {name: (jobs[name][0], jobs[name][1], future.result()) for name, future in futures.items()}


@pytest.mark.parametrize("name", [name for name, _ in SUBPROCESS_CASES])
def test_bad_input_in_a_real_process(in_subprocesses, name):
    world, before, result = in_subprocesses[name]
    check(result, CASES[name], world, before)
