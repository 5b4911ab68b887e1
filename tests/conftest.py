"""Shared fixtures: a tiny BERT saved to disk (so the real loading path runs), tiny labelled CSVs, recipe helpers."""

from __future__ import annotations

import atexit
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Nothing may come from the network, and the tests must not fill the user's datasets cache. Set before anything
# imports `datasets` (it reads the environment once, at import).
_HF_HOME = tempfile.mkdtemp(prefix="finetune-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spin-waits make them 100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_HF_HOME, "datasets"))
# the kit's own caches (frozen-backbone features, measured step choices) too
os.environ.setdefault("FINETUNE_CACHE", os.path.join(_HF_HOME, "finetune"))

REPO = Path(__file__).resolve().parent.parent

# One keyword decides the class; fillers carry no signal. Every word is one token of the tiny vocabulary and every
# text has the same number of words, so batches need no padding and batch-size equivalences hold to float rounding.
KEYWORDS = {
    "food": ["bread", "soup", "cake", "rice", "salad"],
    "sports": ["goal", "match", "team", "score", "ball"],
    "tech": ["chip", "code", "data", "robot", "laptop"],
}
FILLERS = ["the", "a", "of", "and", "today", "very", "news", "story"]
LABELS = sorted(KEYWORDS)
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + FILLERS + [word for label in LABELS for word in KEYWORDS[label]]
REGRESSION_TARGETS = {"food": 95.0, "sports": 100.0, "tech": 105.0}


def _texts(label: str, count: int, seed: int) -> list[str]:
    import random

    rng = random.Random(f"{label}-{seed}")
    texts = []
    for _ in range(count):
        words = rng.sample(FILLERS, 3)
        words.insert(rng.randrange(4), rng.choice(KEYWORDS[label]))
        texts.append(" ".join(words))
    return texts


def _rows(counts: dict[str, int], seed: int) -> list[tuple[str, str]]:
    """(text, label) rows with the classes interleaved (a file is not sorted by label)."""
    per_label = {label: _texts(label, n, seed) for label, n in counts.items()}
    rows = []
    while any(per_label.values()):
        for label in LABELS:
            if per_label.get(label):
                rows.append((per_label[label].pop(), label))
    return rows


def write_csv(path: Path, header: list[str], rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with a 28-word WordPiece vocabulary, saved like any hub folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)})
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        initializer_range=0.3,  # BERT's 0.02 makes a 32-wide model sit on a plateau for many steps before learning
    )
    torch.manual_seed(1234)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def bert4(tmp_path_factory) -> Path:
    """tiny_bert's vocabulary and width with 4 layers: a teacher's depth, from which students keep some."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path_factory.mktemp("bert4")
    BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)}).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """train (16 rows, a multiple of 8), validation and test CSVs with columns `sentence` and `topic`."""
    root = tmp_path_factory.mktemp("tiny-data")
    header = ["sentence", "topic"]
    return {
        "train": write_csv(root / "train.csv", header, _rows({"food": 6, "sports": 5, "tech": 5}, seed=0)),
        "validation": write_csv(root / "validation.csv", header, _rows({k: 3 for k in LABELS}, seed=1)),
        "test": write_csv(root / "test.csv", header, _rows({k: 3 for k in LABELS}, seed=2)),
    }


@pytest.fixture(scope="session")
def regression_data(tmp_path_factory) -> Path:
    """Targets around 100 that the keyword decides exactly (food 95, sports 100, tech 105)."""
    root = tmp_path_factory.mktemp("regression-data")
    rows = [(text, REGRESSION_TARGETS[label]) for text, label in _rows({k: 8 for k in LABELS}, seed=3)]
    return write_csv(root / "train.csv", ["sentence", "topic"], rows)


@pytest.fixture(scope="session")
def multi_label_data(tmp_path_factory) -> Path:
    """Multi-label rows: the label is an "a|b" string of every topic whose keyword occurs in the text."""
    import random

    rng = random.Random(4)
    rows = []
    for i in range(24):
        chosen = [LABELS[i % 3]] + ([LABELS[(i + 1) % 3]] if i % 2 else [])
        words = rng.sample(FILLERS, 2) + [rng.choice(KEYWORDS[label]) for label in chosen]
        words += rng.sample(FILLERS, 4 - len(words))  # same length for every row
        rng.shuffle(words)
        rows.append((" ".join(words), "|".join(chosen)))
    return write_csv(tmp_path_factory.mktemp("multi-label-data") / "train.csv", ["sentence", "topic"], rows)


def set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def recipe_dict(model_dir: Path, data: dict[str, Path], out_dir: Path, **dotted) -> dict:
    """A recipe dict on the tiny model and CSVs; `dotted` keys ("train.lr") override. Dropout 0, fp32, seed 0."""
    raw = {
        "task": "text-classification",
        "backbone": {"name": str(model_dir), "dropout": 0.0},
        "head": {"type": "linear", "dropout": 0.0},
        "data": {
            "train": str(data["train"]),
            "validation": str(data["validation"]),
            "test": str(data["test"]),
            "text_column": "sentence",
            "label_column": "topic",
            "max_length": 16,
        },
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "lr": 1e-3,
            "warmup": 0,
            "scheduler": "constant",
            "precision": "fp32",
            "seed": 0,
        },
        "output": {"dir": str(out_dir)},
    }
    for key, value in dotted.items():
        set_dotted(raw, key, copy.deepcopy(value))
    return raw


@pytest.fixture
def make_recipe(tiny_bert, tiny_data, tmp_path):
    """make_recipe(**{"train.lr": 1e-3, ...}) -> a recipe dict writing to tmp_path/run."""

    def make(**dotted) -> dict:
        return recipe_dict(tiny_bert, tiny_data, tmp_path / "run", **dotted)

    return make


def write_recipe(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def to_recipe(raw: dict):
    from finetune.recipe import from_dict

    return from_dict(copy.deepcopy(raw))


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_DATASETS_CACHE=os.environ["HF_DATASETS_CACHE"],
    )
    env.update(extra)
    return env


def run_without_finetune(script: str, *args, cwd, timeout=180) -> dict:
    """`python -c SCRIPT ARGS` outside the checkout (as a user without finetune would run it); returns the JSON on
    its last stdout line."""
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        check=False,
        cwd=cwd,
        env=subprocess_env(PYTHONPATH=""),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cli(*args, cwd=None, timeout=240, **env) -> subprocess.CompletedProcess:
    """`python -m finetune ARGS` in a subprocess, offline, with text output."""
    return subprocess.run(
        [sys.executable, "-m", "finetune", *map(str, args)],
        check=False,
        cwd=cwd,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """Bad input: exit 2, exactly one non-empty line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    return lines[0]


def call_main(capfd, *argv) -> subprocess.CompletedProcess:
    """`finetune ARGS` in this process, with what it wrote to the stdout and stderr file descriptors."""
    from finetune.cli import main

    capfd.readouterr()
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def run_export_card(folder, *files) -> tuple[object, list]:
    """The python block of an export's README.md run with `python -I` in the export folder (files copied in beside
    it), with finetune and torch made unimportable: (the example `inputs` it names or None, each printed line read
    as a Python literal)."""
    import ast
    import re
    import shutil

    code = re.search(r"```python\n(.*?)```", (Path(folder) / "README.md").read_text(), re.S).group(1)
    for file in files:
        shutil.copy(file, folder)
    guard = 'import sys\nsys.modules["finetune"] = None\nsys.modules["torch"] = None\n'
    done = subprocess.run([sys.executable, "-I", "-c", guard + code], cwd=folder, capture_output=True, text=True,
                          timeout=180, check=False, env=subprocess_env(PYTHONPATH=""))
    assert done.returncode == 0, done.stderr[-3000:]
    line = next((line for line in code.splitlines() if line.startswith("inputs = ")), None)
    inputs = None if line is None else ast.literal_eval(line.split("=", 1)[1].split("  #")[0].strip())
    return inputs, [ast.literal_eval(printed) for printed in done.stdout.strip().splitlines()]


WHERE_TO_LOOK = ("plots: ", "curves: ", "try it: ")  # the run's closing lines (finetune.train.where_to_look)


def before_where_to_look(log: str) -> list[str]:
    """A run log's lines up to its closing "where to look" lines, which must all come last."""
    lines = log.rstrip().splitlines()
    while lines and lines[-1].startswith(WHERE_TO_LOOK):
        lines.pop()
    assert not any(line.startswith(WHERE_TO_LOOK) for line in lines), "where-to-look lines before the end"
    return lines


# The files that take longest, first: each worker takes whole files (--dist loadfile), so a long file started last
# runs alone at the end while the other worker idles (6:28 on 2 cores with the long image file last).
LONGEST_FIRST = (
    "test_export_onnx.py", "test_vision_train.py", "test_resume.py", "test_cli.py", "test_export_tasks.py",
    "test_api.py", "test_token_task.py", "test_train.py", "test_hub.py", "test_serve_page.py", "test_shrink.py",
    "test_sweep.py", "test_checkpoint_faults.py", "test_distill.py", "test_tasks.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
