"""`finetune audit`: planted label flips found on a separable toy set, label_issues.csv naming each row's file and line,
--clean's copy (the input untouched), multi-label and tags, --finetune's fold runs, and the refusals."""

from __future__ import annotations

import csv
import hashlib
import random
from pathlib import Path

import pytest
from conftest import FILLERS, KEYWORDS, LABELS, VOCAB, call_main, one_error_line, recipe_dict, write_csv, write_recipe

COLUMNS = ("split", "file", "location", "input", "given_label", "suggested_label", "label_quality")
FLIPS = 12  # of 120 training rows: 10%
UNSPLIT = {"data.validation": None, "data.test": None}  # validation held out of train (and audited with it)


def only_train(path: Path) -> dict:
    return {"train": path, "validation": path, "test": path}


@pytest.fixture(scope="module")
def probe_bert(tmp_path_factory) -> Path:
    """conftest's tiny BERT made 64 wide with BERT's own 0.02 init: frozen and random, its mean-pooled features still
    tell the keyword apart (the 32-wide one at 0.3 mixes the words beyond what a linear head separates)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path_factory.mktemp("probe-bert")
    BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)}).save_pretrained(directory)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, initializer_range=0.02)
    torch.manual_seed(1234)
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> dict:
    """120 two-word rows (40 a class) whose keyword decides the class, 12 labels flipped (seeded): the file and the
    flipped rows' lines."""
    rng = random.Random(7)
    rows = []
    for label in LABELS:
        for _ in range(40):
            words = [rng.choice(FILLERS), rng.choice(KEYWORDS[label])]
            rng.shuffle(words)
            rows.append((" ".join(words), label))
    rng.shuffle(rows)
    flipped = sorted(rng.sample(range(len(rows)), FLIPS))
    for i in flipped:
        text, label = rows[i]
        rows[i] = (text, rng.choice([other for other in LABELS if other != label]))
    path = write_csv(tmp_path_factory.mktemp("noisy") / "train.csv", ["sentence", "topic"], rows)
    return {"train": path, "lines": {i + 2 for i in flipped}}  # line 1 is the header


def audit_recipe(probe_bert, noisy, tmp_path, **dotted) -> Path:
    raw = recipe_dict(probe_bert, only_train(noisy["train"]), tmp_path / "run",
                      **{"head.pooling": "mean", "train.lr": 1e-2, **UNSPLIT, **dotted})
    return write_recipe(tmp_path / "audit.yaml", raw)


def read_issues(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_audit_finds_most_planted_flips_and_clean_drops_them(probe_bert, noisy, tmp_path, capfd):
    before = digest(noisy["train"])
    recipe = audit_recipe(probe_bert, noisy, tmp_path)
    clean = tmp_path / "clean.csv"
    result = call_main(capfd, "audit", recipe, "--folds", "5", "--output", tmp_path / "audit", "--clean", clean)
    assert result.returncode == 0, result.stderr
    issues = read_issues(tmp_path / "audit" / "label_issues.csv")
    assert list(issues[0]) == list(COLUMNS)
    flagged = {int(row["location"].removeprefix("line ")) for row in issues}
    found = flagged & noisy["lines"]
    precision, recall = len(found) / max(len(flagged), 1), len(found) / FLIPS
    print(f"planted {FLIPS}, flagged {len(flagged)}, precision {precision:.2f}, recall {recall:.2f}")
    assert precision > 0.5 and recall > 0.5, (precision, recall)
    qualities = [float(row["label_quality"]) for row in issues]
    assert qualities == sorted(qualities)  # most suspicious first
    top = {int(row["location"].removeprefix("line ")) for row in issues[: FLIPS // 2]}
    assert len(top & noisy["lines"]) >= FLIPS // 2 - 1  # the flips rank near the top
    assert {row["split"] for row in issues} <= {"train", "validation"}
    assert all(row["file"] == str(noisy["train"]) for row in issues)
    # every flagged row's input and given label are those on its line of the file
    lines = noisy["train"].read_text().splitlines()
    for row in issues:
        number = int(row["location"].removeprefix("line "))
        assert lines[number - 1] == f"{row['input']},{row['given_label']}"
    assert "estimated label noise per class" in result.stdout
    # --clean: the flagged rows gone, every other line as it was; the input file unchanged
    assert digest(noisy["train"]) == before
    kept = clean.read_text().splitlines()
    assert kept == [line for number, line in enumerate(lines, 1) if number not in flagged]


def test_regression_is_refused_in_one_line(tiny_bert, regression_data, tmp_path, capfd):
    raw = recipe_dict(tiny_bert, only_train(regression_data), tmp_path / "run",
                      **{"head.problem": "regression", **UNSPLIT})
    result = call_main(capfd, "audit", write_recipe(tmp_path / "r.yaml", raw))
    line = one_error_line(result)
    assert "regression" in line and "cleanlab" in line


def test_too_many_folds_for_the_rows_is_one_line(tiny_bert, tiny_data, tmp_path, capfd):
    raw = recipe_dict(tiny_bert, tiny_data, tmp_path / "run")
    result = call_main(capfd, "audit", write_recipe(tmp_path / "r.yaml", raw), "--folds", "40")
    assert "--folds" in one_error_line(result)


def test_clean_refuses_to_overwrite_the_training_file(probe_bert, noisy, tmp_path, capfd):
    recipe = audit_recipe(probe_bert, noisy, tmp_path)
    result = call_main(capfd, "audit", recipe, "--clean", noisy["train"])
    assert "never changed" in one_error_line(result)


def test_multi_label_writes_label_issues(tiny_bert, multi_label_data, tmp_path, capfd):
    raw = recipe_dict(tiny_bert, only_train(multi_label_data), tmp_path / "run",
                      **{"head.problem": "multi_label", "head.pooling": "mean", **UNSPLIT})
    result = call_main(capfd, "audit", write_recipe(tmp_path / "r.yaml", raw), "--folds", "3", "--output",
                       tmp_path / "audit")
    assert result.returncode == 0, result.stderr
    with (tmp_path / "audit" / "label_issues.csv").open(newline="") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == list(COLUMNS)
        for row in reader:
            assert set(row["given_label"].split("|")) <= set(LABELS) | {""}


def test_token_classification_flags_words_by_their_conll_line(tmp_path, capfd):
    from test_token_classification import corpus, write
    from test_token_task import token_raw

    backbone = _tagger(tmp_path)
    train = write(tmp_path / "train.conll", corpus(0, 40))
    raw = token_raw(backbone, {"train": train, "validation": train, "test": train}, tmp_path / "run")
    raw["data"].update(validation=None, test=None)
    raw["train"]["epochs"] = 3
    result = call_main(capfd, "audit", write_recipe(tmp_path / "r.yaml", raw), "--folds", "2", "--output",
                       tmp_path / "audit", "--clean", tmp_path / "clean.conll")
    assert result.returncode == 0, result.stderr
    issues = read_issues(tmp_path / "audit" / "label_issues.csv")
    assert issues and list(issues[0]) == list(COLUMNS)
    lines = train.read_text().splitlines()
    for row in issues:  # "line N, word J": the sentence's first line, and the word J lines below it
        first, word = row["location"].removeprefix("line ").split(", word ")
        assert lines[int(first) + int(word) - 2].split() == [row["input"].split()[int(word) - 1].strip("[]"),
                                                              row["given_label"]]
    kept = (tmp_path / "clean.conll").read_text()
    sentences = [block for block in train.read_text().split("\n\n") if block.strip()]
    assert len([b for b in kept.split("\n\n") if b.strip()]) == len(sentences) - len(
        {row["location"].split(",")[0] for row in issues})


def _tagger(tmp_path: Path) -> Path:
    import torch
    from test_token_classification import PIECES, SPECIAL
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path / "tagger"
    BertTokenizer(vocab={word: i for i, word in enumerate(SPECIAL + PIECES)}).save_pretrained(directory)
    config = BertConfig(vocab_size=len(SPECIAL + PIECES), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return directory


def test_finetune_runs_an_ordinary_run_per_fold_on_copies_without_the_held_out_rows(tiny_bert, tiny_data, tmp_path,
                                                                                     capfd):
    raw = recipe_dict(tiny_bert, tiny_data, tmp_path / "run", **{"data.test": None})
    before = {key: digest(path) for key, path in tiny_data.items()}
    result = call_main(capfd, "audit", write_recipe(tmp_path / "r.yaml", raw), "--finetune", "--folds", "2",
                       "--output", tmp_path / "audit")
    assert result.returncode == 0, result.stderr
    assert read_issues(tmp_path / "audit" / "label_issues.csv") is not None
    rows = {key: len(tiny_data[key].read_text().splitlines()) - 1 for key in ("train", "validation")}
    held = 0
    for fold in (1, 2):
        folder = tmp_path / "audit" / "folds" / f"fold-{fold}"
        assert (folder / "run" / "model").is_dir() and (folder / "run" / "metrics.json").is_file()
        kept = {key: len((folder / f"{key}.csv").read_text().splitlines()) - 1 for key in ("train", "validation")}
        held += sum(rows.values()) - sum(kept.values())
    assert held == sum(rows.values())  # every row held out by exactly one fold
    assert {key: digest(path) for key, path in tiny_data.items()} == before


def test_an_image_folder_is_audited_by_path_and_cleaned_into_a_csv_list(tmp_path, capfd):
    import shutil

    from test_vision_train import save_split, vision_raw

    root = save_split(tmp_path / "images", 10, seed=0)
    planted = {"red/003.png": "blue", "blue/004.png": "gray", "gray/005.png": "red"}
    for path, wrong in planted.items():  # an image filed under another class's folder
        shutil.move(root / path, root / wrong / f"moved-{Path(path).name}")
    moved = {f"{wrong}/moved-{Path(path).name}" for path, wrong in planted.items()}
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    raw = vision_raw({"train": root, "validation": root, "test": root}, tmp_path / "run")
    raw["data"].update(validation=None, test=None)
    clean = tmp_path / "clean.csv"
    result = call_main(capfd, "audit", write_recipe(tmp_path / "r.yaml", raw), "--folds", "3", "--output",
                       tmp_path / "audit", "--clean", clean)
    assert result.returncode == 0, result.stderr
    issues = read_issues(tmp_path / "audit" / "label_issues.csv")
    flagged = {row["location"] for row in issues}
    print(f"images: planted {len(moved)}, flagged {len(flagged)}, found {len(flagged & moved)}")
    assert flagged <= set(files) and flagged & moved
    for row in issues:
        assert row["given_label"] == row["location"].split("/")[0] and row["input"] == str(root / row["location"])
    with clean.open(newline="") as file:
        kept = [(Path(entry["image"]).relative_to(root.resolve()).as_posix(), entry["label"])
                for entry in csv.DictReader(file)]
    assert sorted(kept) == [(path, path.split("/")[0]) for path in files if path not in flagged]
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == files  # the folder unchanged


def test_clean_copies_keep_every_other_record_as_written(tmp_path):
    """Rows are counted as the data layer reads them: a quoted field spanning lines is one record, blank lines are
    none; the kept records are copied byte for byte."""
    from finetune.data import load_table
    from finetune.tasks.row_files import write_table_without

    text = 'text,label\n"two\nlines",a\n\nplain,b\n"say ""hi""",a\nlast,b\n'
    (tmp_path / "in.csv").write_text(text)
    assert list(load_table(tmp_path / "in.csv", "in.csv")["text"]) == ["two\nlines", "plain", 'say "hi"', "last"]
    assert write_table_without(tmp_path / "in.csv", {0, 2}, tmp_path / "out.csv") == 2
    assert (tmp_path / "out.csv").read_text() == "text,label\n\nplain,b\nlast,b\n"
    (tmp_path / "in.jsonl").write_text('{"text": "x", "label": "a"}\n\n{"text": "y", "label": "b"}\n')
    assert write_table_without(tmp_path / "in.jsonl", {1}, tmp_path / "out.jsonl") == 1
    assert (tmp_path / "out.jsonl").read_text() == '{"text": "x", "label": "a"}\n'


def test_clean_in_another_format_and_a_zoo_set_are_refused_before_the_folds(probe_bert, noisy, tmp_path, capfd):
    recipe = audit_recipe(probe_bert, noisy, tmp_path)
    assert ".csv" in one_error_line(call_main(capfd, "audit", recipe, "--clean", tmp_path / "clean.jsonl"))
    line = one_error_line(call_main(capfd, "audit", recipe, "data.train=bbc-news", "--finetune"))
    assert "bbc-news" in line and "zoo" in line
