"""data: reading files and the zoo, the label space, row-numbered errors, splitting, capping, encoding, tokenising."""

import collections
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from finetune.data import stratified_split
from finetune.tasks.text_classification.reading import load_text_splits as load_splits
from finetune.tasks.text_classification.tokens import tokenize_texts as tokenize
from finetune.errors import FinetuneError
from finetune.recipe import from_dict


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """Keep `datasets`' caches (file loading, tokenised sets) out of the user's home."""
    import datasets

    cache = tmp_path_factory.getbasetemp() / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def make_recipe(problem="single_label", seed=42, **data):
    return from_dict(
        {
            "task": "text-classification",
            "backbone": {"name": "minilm-l6"},
            "head": {"problem": problem},
            "data": data,
            "train": {"seed": seed},
        }
    )


def load(problem="single_label", seed=42, **data):
    files = {key: str(value) if key in ("train", "validation", "test") else value for key, value in data.items()}
    return load_splits(make_recipe(problem, seed, **files))


def write_csv(path, rows, sep=","):
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False, sep=sep)
    return path


def error_of(**kwargs) -> str:
    with pytest.raises(FinetuneError) as caught:
        load(**kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


TRAIN_ROWS = [
    ("the market rallied", "business"),
    ("a late goal, then a red card", "sport"),
    ("shares fell sharply", "business"),
    ("the striker scored twice", "sport"),
    ("new phone has a faster chip", "tech"),
    ("quarterly profits doubled", "business"),
    ("the keeper saved a penalty", "sport"),
    ("a new chip for laptops", "tech"),
]
VALIDATION_ROWS = [("bank rates rise", "business"), ("cup final tonight", "sport"), ("faster wifi", "tech")]


# ---------------------------------------------------------------------------------------------------------------
# File formats.


def write_format(path, rows, fmt):
    frame = pd.DataFrame(rows, columns=["text", "label"])
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    elif fmt == "json":
        path.write_text(json.dumps([{"text": t, "label": y} for t, y in rows]))
    elif fmt == "parquet":
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_each_file_format_loads(tmp_path, fmt):
    train = write_format(tmp_path / f"train.{fmt}", TRAIN_ROWS, fmt)
    validation = write_format(tmp_path / f"validation.{fmt}", VALIDATION_ROWS, fmt)
    test = write_format(tmp_path / f"test.{fmt}", VALIDATION_ROWS[:2], fmt)
    splits = load(train=train, validation=validation, test=test)
    assert splits.label_names == ["business", "sport", "tech"]
    assert list(splits.train["text"]) == [t for t, _ in TRAIN_ROWS]  # commas inside a field survive in csv and tsv
    assert list(splits.train["label"]) == [["business", "sport", "tech"].index(y) for _, y in TRAIN_ROWS]
    assert list(splits.validation["text"]) == [t for t, _ in VALIDATION_ROWS]
    assert list(splits.validation["label"]) == [0, 1, 2]
    assert list(splits.test["label"]) == [0, 1]
    counts = {key: value["count"] for key, value in splits.info["splits"].items()}
    assert counts == {"train": 8, "validation": 3, "test": 2}
    assert splits.info["validation_held_out_from_train"] is False
    json.dumps(splits.info)  # what split.json records is plain data


def test_no_test_file_means_no_test_split(tmp_path):
    train, validation = write_csv(tmp_path / "t.csv", TRAIN_ROWS), write_csv(tmp_path / "v.csv", VALIDATION_ROWS)
    splits = load(train=train, validation=validation)
    assert splits.test is None
    assert "test" not in splits.info["splits"]


def test_other_column_names(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"body": [t for t, _ in TRAIN_ROWS], "topic": [y for _, y in TRAIN_ROWS], "extra": 1}).to_csv(
        path, index=False
    )
    splits = load(train=path, validation=path, text_column="body", label_column="topic")
    assert list(splits.train["text"]) == [t for t, _ in TRAIN_ROWS]
    assert splits.label_names == ["business", "sport", "tech"]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("absent.csv", None, "not found"),
        ("data.txt", "text,label\na,b\n", "unknown extension"),
        ("empty.csv", "", "is empty"),
        ("header.csv", "text,label\n", ""),  # "cannot be read (... corresponds to no data!)" today
    ],
)
def test_unreadable_files(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    message = error_of(train=path)
    assert message.startswith("data.train: ")
    assert f"'{path}'" in message
    assert expected in message


# ---------------------------------------------------------------------------------------------------------------
# Labels.


def test_label_names_sorted_numbers_numerically(tmp_path):
    rows = [(f"text {i}", label) for i, label in enumerate([10, 2, 1, 10, 2, 1])]
    splits = load(train=write_csv(tmp_path / "t.csv", rows), validation=write_csv(tmp_path / "v.csv", rows[:3]))
    assert splits.label_names == ["1", "2", "10"]
    assert list(splits.train["label"]) == [2, 1, 0, 2, 1, 0]
    assert splits.info["labels"] == ["1", "2", "10"]


def test_label_names_sorted_alphabetically(tmp_path):
    rows = [("a", "pear"), ("b", "apple"), ("c", "fig"), ("d", "apple")]
    splits = load(train=write_csv(tmp_path / "t.csv", rows), validation=write_csv(tmp_path / "v.csv", rows))
    assert splits.label_names == ["apple", "fig", "pear"]
    assert list(splits.train["label"]) == [2, 0, 1, 0]


def test_integer_labels_read_as_floats_keep_their_integer_names(tmp_path):
    # a JSON column mixing 1 and 2.0 becomes floats; the names stay "1" and "2"
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": 1.0}\n{"text": "b", "label": 2.0}\n{"text": "c", "label": 1.0}\n')
    splits = load(train=path, validation=path)
    assert splits.label_names == ["1", "2"]


def test_validation_label_not_in_train(tmp_path):
    validation = write_csv(tmp_path / "val.csv", [("bank rates rise", "business"), ("a zebra escaped", "zebra")])
    message = error_of(train=write_csv(tmp_path / "t.csv", TRAIN_ROWS), validation=validation)
    assert "val.csv" in message
    assert "line 3" in message  # header is line 1, the zebra row line 3
    assert "'zebra'" in message
    assert "data.validation" in message
    assert "business, sport, tech" in message


def test_a_single_training_label_is_rejected(tmp_path):
    rows = [("a", "x"), ("b", "x")]
    message = error_of(train=write_csv(tmp_path / "t.csv", rows), validation=write_csv(tmp_path / "v.csv", rows))
    assert "only 1 label" in message


def test_missing_label_names_the_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nfirst,x\nsecond,\nthird,y\n")
    message = error_of(train=path, validation=path)
    assert "t.csv" in message and "line 3" in message and "missing label" in message


@pytest.mark.parametrize(
    "name, content, line, odd",
    [
        ("mixed.csv", "text,label\na,0\nb,1\nc,positive\nd,1\n", 4, "'positive' is text"),
        ("mixed.jsonl", '{"text":"a","label":"pos"}\n{"text":"b","label":"neg"}\n{"text":"c","label":1}\n', 3,
         "1 is a number"),
        ("bools.jsonl", '{"text":"a","label":true}\n{"text":"b","label":false}\n{"text":"c","label":"maybe"}\n', 3,
         "'maybe' is text"),
    ],
)
def test_mixed_label_types_name_the_odd_row(tmp_path, name, content, line, odd):
    path = tmp_path / name
    path.write_text(content)
    message = error_of(train=path, validation=path)
    assert f"line {line}:" in message and odd in message and "mixed label types" in message


def test_a_list_label_needs_multi_label(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text":"a","label":["x","y"]}\n{"text":"b","label":["y"]}\n')
    message = error_of(train=path, validation=path)
    assert "line 1" in message and "head.problem=multi_label" in message


@pytest.mark.parametrize(
    "option, column, close, columns",
    [("text_column", "txt", "text", "text, label"), ("label_column", "lable", "label", "text, label")],
)
def test_missing_column(tmp_path, option, column, close, columns):
    message = error_of(train=write_csv(tmp_path / "t.csv", TRAIN_ROWS), **{option: column})
    assert f"no column '{column}'" in message
    assert f"data.{option}" in message
    assert f"did you mean data.{option}={close}?" in message
    assert f"columns: {columns}" in message
    assert "t.csv" in message


def test_missing_column_without_a_close_name_still_lists_columns(tmp_path):
    message = error_of(train=write_csv(tmp_path / "t.csv", TRAIN_ROWS), label_column="zzzz")
    assert "no column 'zzzz'" in message and "did you mean" not in message and "columns: text, label" in message


def test_empty_and_blank_texts_are_dropped_and_listed_with_their_lines(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label\nhello,x\n,y\nfoo,x\n"   ",y\nbar,y\n')
    splits = load(train=path, validation=path)
    assert list(splits.train["text"]) == ["hello", "foo", "bar"]
    assert splits.train["row"] == [0, 2, 4]
    assert splits.info["splits"]["train"]["empty_texts"] == ["'" + str(path) + "' line 3: empty text",
                                                             "'" + str(path) + "' line 5: empty text"]
    assert splits.info["splits"]["train"]["count"] == 3
    assert "skipped" not in splits.info["splits"]["train"]  # train.py reports "skipped" as unreadable images


def test_blank_text_in_jsonl_and_json_rows_are_named(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(
        '{"text": "hello", "label": "x"}\n{"text": "   ", "label": "y"}\n{"text": "foo", "label": "y"}\n'
    )
    assert load(train=jsonl, validation=jsonl).info["splits"]["train"]["empty_texts"] == [
        f"'{jsonl}' line 2: empty text"
    ]
    array = tmp_path / "t.json"
    array.write_text(
        json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": None, "label": "x"}])
    )
    assert load(train=array, validation=array).info["splits"]["train"]["empty_texts"] == [
        f"'{array}' row 3: empty text"
    ]


def test_a_split_of_only_empty_texts_is_an_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n,x\n  ,y\n")
    message = error_of(train=write_csv(tmp_path / "ok.csv", TRAIN_ROWS), validation=path)
    assert "data.validation" in message and "every text in column 'text'" in message and "t.csv" in message


def test_a_text_column_of_numbers_is_an_error_naming_the_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n1,x\n2,y\n3,x\n")
    message = error_of(train=path, validation=path)
    assert "column 'text' holds a number" in message and "line 2" in message and "data.text_column" in message


@pytest.mark.parametrize(
    "name, content, line",
    [
        ("multiline.csv", 'text,label\n"first\nline",x\nsecond,\nfoo,x\nbar,y\n', 4),
        ("blank.csv", "text,label\nfirst,x\n\nsecond,y\nthird,\nbar,y\n", 5),
        ("blank.jsonl", '{"text":"a","label":"x"}\n\n{"text":"b","label":"y"}\n{"text":"c","label":null}\n', 4),
    ],
    ids=["csv-multiline-field", "csv-blank-line", "jsonl-blank-line"],
)
def test_line_numbers_match_the_file_when_records_span_lines(tmp_path, name, content, line):
    path = tmp_path / name
    path.write_text(content)
    message = error_of(train=path, validation=path)
    assert f"line {line}:" in message and "missing label" in message


# ---------------------------------------------------------------------------------------------------------------
# Malformed files: each error names the file and says how to fix it.


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("semicolons.csv", "text;label\na;x\nb;y\n", "semicolon-separated"),
        ("tabs.csv", "text\tlabel\na, b\tx\nc\ty\n", "tab-separated"),  # a comma in a text: pandas makes it the index
        ("commas.tsv", "text,label\na,x\nb,y\n", "comma-separated"),
        ("latin1.csv", "text,label\nok,x\ncaf\xe9,y\n".encode("latin-1"), "line 3 is not UTF-8"),
        ("latin1.jsonl", '{"text": "ok", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n'.encode("latin-1"),
         "line 2 is not UTF-8"),
        ("excel.csv", "text,label\na,x\n".encode("utf-16"), "is UTF-16 text; re-save the file as UTF-8"),
        ("blank.csv", "\n  \n\n", "is empty"),
        ("unquoted.csv", "text,label\na,x\nhello, world,y\n", "line 3 has 3 fields but the header has 2"),
        ("unclosed.csv", 'text,label\na,x\n"b,y\n', "line 3 opens a double quote"),
        ("broken.jsonl", '{"text": "a", "label": "x"}\n{"text": \n', "cannot be read"),
        ("broken.parquet", "not parquet at all", "cannot be read"),
        ("nulls.jsonl", "null\nnull\n", "starts with 'null"),  # pyarrow segfaults on this one
        ("number.json", "\n 42", "starts with '42', not a JSON object"),
    ],
)
def test_malformed_files_name_the_file_and_the_fix(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = error_of(train=path)
    assert message.startswith(f"data.train: '{path}'") and expected in message, message


def test_a_directory_is_not_a_data_file(tmp_path):
    (tmp_path / "train.csv").mkdir()
    assert "is a directory" in error_of(train=tmp_path / "train.csv")


def test_a_zoo_name_typo_suggests_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "did you mean 'bbc-news'?" in error_of(train="bbc-new")


def test_the_text_and_label_columns_must_differ(tmp_path):
    message = error_of(train=write_csv(tmp_path / "t.csv", TRAIN_ROWS), label_column="text")
    assert "data.text_column and data.label_column both name column 'text'" in message


def test_a_bom_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufefftext,label\na,x\nb,y\n".encode("utf-8"))
    assert load(train=path, validation=path).label_names == ["x", "y"]


def test_parse_errors_print_nothing_but_the_error(tmp_path, capfd):
    path = tmp_path / "t.csv"
    path.write_text("text,label\na,x\nhello, world,y\n")
    error_of(train=path)
    assert capfd.readouterr().err == ""  # datasets logs the parser error itself unless told not to


# ---------------------------------------------------------------------------------------------------------------
# stratified_split.

LABELS = ["a"] * 60 + ["b"] * 30 + ["c"] * 10


def test_stratified_split_keeps_class_proportions():
    kept, held = stratified_split(LABELS, 0.2, seed=0)
    assert collections.Counter(LABELS[i] for i in held) == {"a": 12, "b": 6, "c": 2}
    assert collections.Counter(LABELS[i] for i in kept) == {"a": 48, "b": 24, "c": 8}


def test_stratified_split_is_a_partition():
    kept, held = stratified_split(LABELS, 0.15, seed=3)
    assert not set(kept) & set(held)
    assert sorted(kept + held) == list(range(len(LABELS)))
    assert len(held) == 15
    assert kept == sorted(kept) and held == sorted(held)


def test_stratified_split_is_deterministic_per_seed_and_seeds_differ():
    assert stratified_split(LABELS, 0.2, seed=1) == stratified_split(LABELS, 0.2, seed=1)
    helds = {tuple(stratified_split(LABELS, 0.2, seed=s)[1]) for s in range(5)}
    assert len(helds) == 5


def test_stratified_split_keeps_one_of_each_class_in_train():
    labels = ["a"] * 10 + ["b"] * 2 + ["c"]
    for seed in range(10):
        kept, held = stratified_split(labels, 0.9, seed=seed)
        assert {labels[i] for i in kept} == {"a", "b", "c"}
        assert held


def test_stratified_split_rounds_small_classes_by_largest_remainder():
    labels = ["a"] * 7 + ["b"] * 5 + ["c"] * 3  # shares at 0.2: 1.4, 1.0, 0.6 -> total 3
    kept, held = stratified_split(labels, 0.2, seed=0)
    assert collections.Counter(labels[i] for i in held) == {"a": 1, "b": 1, "c": 1}


def test_stratified_split_with_nothing_to_hold_out():
    with pytest.raises(FinetuneError, match="data.validation"):
        stratified_split(["a", "b", "c"], 0.1, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# The validation split held out of train.


def balanced_rows(n=40):
    return [(f"example number {i}", "even" if i % 2 == 0 else "odd") for i in range(n)]


def test_held_out_validation_is_recorded_and_covers_the_file(tmp_path):
    rows = balanced_rows(40)
    splits = load(train=write_csv(tmp_path / "t.csv", rows), val_fraction=0.25)
    info = splits.info
    assert info["validation_held_out_from_train"] is True
    train_rows, val_rows = info["splits"]["train"]["rows"], info["splits"]["validation"]["rows"]
    assert not set(train_rows) & set(val_rows)
    assert sorted(train_rows + val_rows) == list(range(40))
    assert info["splits"]["train"]["count"] == 30 and info["splits"]["validation"]["count"] == 10
    # stratified: 5 of each class held out
    assert collections.Counter(rows[r][1] for r in val_rows) == {"even": 5, "odd": 5}
    # the rows recorded are the rows whose text and label the tables hold
    assert list(splits.validation["text"]) == [rows[r][0] for r in val_rows]
    assert list(splits.train["row"]) == train_rows
    assert [splits.label_names[y] for y in splits.train["label"]] == [rows[r][1] for r in train_rows]
    json.dumps(info)


def test_held_out_validation_follows_train_seed(tmp_path):
    path = write_csv(tmp_path / "t.csv", balanced_rows(40))
    first = load(train=path, seed=1).info["splits"]["validation"]["rows"]
    assert load(train=path, seed=1).info["splits"]["validation"]["rows"] == first
    assert load(train=path, seed=2).info["splits"]["validation"]["rows"] != first


# ---------------------------------------------------------------------------------------------------------------
# max_samples.


def test_max_samples_caps_each_split_and_labels_come_from_all_of_train(tmp_path):
    train_rows = [(f"common {i}", "common") for i in range(20)] + [("the only rare one", "rare"), ("odd one", "odd")]
    eval_rows = [(f"eval {i}", "common") for i in range(6)] + [("a rare eval row", "rare")]
    splits = load(
        train=write_csv(tmp_path / "t.csv", train_rows),
        validation=write_csv(tmp_path / "v.csv", eval_rows),
        test=write_csv(tmp_path / "test.csv", eval_rows),
        max_samples=4,
    )
    assert [len(splits.train["text"]), len(splits.validation["text"]), len(splits.test["text"])] == [4, 4, 4]
    assert splits.label_names == ["common", "odd", "rare"]  # from all 22 rows, not the 4 kept
    assert {key: value["count"] for key, value in splits.info["splits"].items()} == {
        "train": 4, "validation": 4, "test": 4
    }
    train_texts = dict(train_rows)
    for text, label, row in zip(splits.train["text"], splits.train["label"], splits.train["row"]):
        assert train_rows[row] == (text, splits.label_names[label])
        assert text in train_texts


def test_max_samples_is_deterministic_and_larger_than_the_data_keeps_everything(tmp_path):
    path = write_csv(tmp_path / "t.csv", balanced_rows(30))
    validation = write_csv(tmp_path / "v.csv", balanced_rows(6))
    first = load(train=path, validation=validation, max_samples=5).train["row"]
    assert load(train=path, validation=validation, max_samples=5).train["row"] == first
    assert len(load(train=path, validation=validation, max_samples=1000).train["row"]) == 30


# ---------------------------------------------------------------------------------------------------------------
# Multi-label.


def test_multi_label_from_pipe_strings(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label\nfirst,joy|surprise\nsecond,anger\nthird, surprise | joy \nfourth,anger|joy\n')
    validation = tmp_path / "v.csv"
    validation.write_text("text,label\nv1,joy\n")
    splits = load("multi_label", train=path, validation=validation)
    assert splits.label_names == ["anger", "joy", "surprise"]
    assert splits.train["label"] == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    assert splits.validation["label"] == [[0.0, 1.0, 0.0]]


def test_multi_label_from_json_lists(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [("a", ["b", "a"]), ("b", ["c"]), ("c", []), ("d", ["a", "c"])]
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    splits = load("multi_label", train=path, validation=path)
    assert splits.label_names == ["a", "b", "c"]
    assert splits.train["label"] == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]


def test_multi_label_unknown_label_in_validation(tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text('{"text": "a", "label": ["x"]}\n{"text": "b", "label": ["y"]}\n')
    validation = tmp_path / "v.jsonl"
    validation.write_text('{"text": "a", "label": ["x"]}\n{"text": "b", "label": ["y", "q"]}\n')
    message = error_of(problem="multi_label", train=train, validation=validation)
    assert "v.jsonl" in message and "line 2" in message and "'q'" in message


def test_multi_label_held_out_validation(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{'x|y' if i % 3 else 'y'}\n" for i in range(20)))
    splits = load("multi_label", train=path, val_fraction=0.2)
    assert len(splits.validation["text"]) == 4 and len(splits.train["text"]) == 16
    assert all(len(hot) == 2 for hot in splits.validation["label"])


# ---------------------------------------------------------------------------------------------------------------
# Regression.


def write_targets(path, targets):
    path.write_text("text,label\n" + "".join(f"text {i},{t}\n" for i, t in enumerate(targets)))
    return path


def test_regression_targets_are_standardised_on_train(tmp_path):
    raw_train = [1.0, 2.0, 3.0, 4.0, 10.0]
    raw_validation = [2.5, 7.0]
    splits = load(
        "regression",
        train=write_targets(tmp_path / "t.csv", raw_train),
        validation=write_targets(tmp_path / "v.csv", raw_validation),
    )
    mean, std = np.mean(raw_train), np.std(raw_train)
    assert splits.label_names is None
    assert splits.target_mean == pytest.approx(mean) and splits.target_std == pytest.approx(std)
    assert splits.info["target"] == {"mean": pytest.approx(mean), "std": pytest.approx(std)}
    train = np.asarray(splits.train["label"])
    assert train.mean() == pytest.approx(0.0, abs=1e-12) and train.std() == pytest.approx(1.0)
    # validation is scaled with train's statistics, so predictions decode with target_mean/std
    np.testing.assert_allclose(splits.validation["label"], (np.array(raw_validation) - mean) / std)
    np.testing.assert_allclose(train * splits.target_std + splits.target_mean, raw_train)


def test_regression_constant_targets_do_not_divide_by_zero(tmp_path):
    path = write_targets(tmp_path / "t.csv", [3.0, 3.0, 3.0])
    splits = load("regression", train=path, validation=path)
    assert splits.target_std == 1.0 and splits.train["label"] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad, expected", [("", "missing regression target"), ("nan", "(empty or NaN)"),
                                           ("abc", "'abc'"), ("inf", "not a finite number")])
def test_regression_bad_target_names_the_line(tmp_path, bad, expected):
    path = write_targets(tmp_path / "t.csv", ["1.5", "2", bad, "4"])
    message = error_of(problem="regression", train=path, validation=write_targets(tmp_path / "v.csv", [1, 2]))
    assert "t.csv" in message and "line 4" in message
    assert expected in message


def test_a_true_false_regression_target_is_not_a_number(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text":"a","label":1.5}\n{"text":"b","label":true}\n')
    message = error_of(problem="regression", train=path, validation=path)
    assert "line 2" in message and "True is not a finite number" in message


def test_regression_nan_in_validation_names_its_file(tmp_path):
    validation = write_targets(tmp_path / "v.csv", ["1", "nan"])
    message = error_of(problem="regression", train=write_targets(tmp_path / "t.csv", [1, 2, 3]), validation=validation)
    assert "v.csv" in message and "line 3" in message


# ---------------------------------------------------------------------------------------------------------------
# The bbc-news zoo set.


@pytest.fixture(scope="module")
def bbc():
    return load_splits(make_recipe(train="bbc-news"))


def all_texts(splits):
    return [list(splits.train["text"]), list(splits.validation["text"]), list(splits.test["text"])]


def test_bbc_news_has_2126_unique_articles_in_five_sorted_labels(bbc):
    """2,225 files, 98 exact duplicates, and one test article equal to a training one but for whitespace."""
    texts = all_texts(bbc)
    assert sum(len(t) for t in texts) == 2126
    assert len({text for part in texts for text in part}) == 2126
    assert bbc.label_names == sorted(bbc.label_names) and len(bbc.label_names) == 5
    assert bbc.label_names[0] == "business" and "tech" in bbc.label_names
    assert bbc.info["validation_held_out_from_train"] is False
    assert all(isinstance(t, str) and t.strip() == t and t for part in texts for t in part)


def test_bbc_news_splits_share_no_text(bbc):
    train, validation, test = ({" ".join(text.split()) for text in part} for part in all_texts(bbc))  # as validate
    assert not train & validation and not train & test and not validation & test


def test_bbc_news_splits_are_stratified(bbc):
    sizes = [len(bbc.train["label"]), len(bbc.validation["label"]), len(bbc.test["label"])]
    assert sizes[1] == pytest.approx(0.1 * 2127, abs=3) and sizes[2] == pytest.approx(0.1 * 2127, abs=3)
    for labels in (bbc.validation["label"], bbc.test["label"]):
        shares = np.bincount(labels, minlength=5) / len(labels)
        np.testing.assert_allclose(shares, np.bincount(bbc.train["label"], minlength=5) / sizes[0], atol=0.02)


def test_bbc_news_rows_name_the_article_files(bbc):
    rows = bbc.info["splits"]["test"]["rows"]
    assert all(isinstance(r, str) and r.endswith(".txt") for r in rows)
    for row, label in zip(rows, bbc.test["label"]):
        assert row.split("/")[0] == bbc.label_names[label]


def test_bbc_news_split_is_fixed_and_independent_of_train_seed(bbc):
    again = load_splits(make_recipe(train="bbc-news"))
    other_seed = load_splits(make_recipe(train="bbc-news", seed=7))
    assert all_texts(again) == all_texts(bbc)
    assert all_texts(other_seed) == all_texts(bbc)
    assert other_seed.info["splits"] == bbc.info["splits"]


def test_a_validation_file_replaces_the_zoo_validation(tmp_path):
    validation = write_csv(tmp_path / "v.csv", [("markets rally", "business"), ("cup final", "sports")])
    splits = load(train="bbc-news", validation=validation)
    assert list(splits.validation["text"]) == ["markets rally", "cup final"]
    assert len(splits.test["text"]) > 100  # the zoo test split stays
    assert splits.validation["label"] == [splits.label_names.index("business"), splits.label_names.index("sports")]


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation.


@pytest.fixture(scope="module")
def tokenizer():
    from finetune.backbones import load_tokenizer, resolve_text_source

    return load_tokenizer(resolve_text_source("minilm-l6"))


TABLE = {"text": ["great phone", "terrible battery life, would not buy again " * 20], "label": [1, 0]}


def test_tokenize_returns_ids_mask_and_labels(tokenizer):
    dataset = tokenize(TABLE, tokenizer, max_length=16)
    assert {"input_ids", "attention_mask", "label"} <= set(dataset.column_names)
    assert "text" not in dataset.column_names
    assert len(dataset) == 2
    assert dataset["label"] == [1, 0]
    assert dataset[0]["input_ids"] == tokenizer("great phone")["input_ids"]
    assert dataset[0]["input_ids"][0] == tokenizer.cls_token_id
    assert dataset[0]["input_ids"][-1] == tokenizer.sep_token_id
    assert len(dataset[1]["input_ids"]) == 16  # truncated to max_length, not padded
    assert len(dataset[0]["input_ids"]) < 16
    assert all(len(m) == len(i) for m, i in zip(dataset["attention_mask"], dataset["input_ids"]))


def test_tokenize_keeps_multi_hot_and_regression_labels(tokenizer):
    dataset = tokenize({"text": ["a", "b"], "label": [[1.0, 0.0], [0.5, 1.0]]}, tokenizer, max_length=8)
    assert dataset["label"] == [[1.0, 0.0], [0.5, 1.0]]
    dataset = tokenize({"text": ["a", "b"], "label": [-0.25, 1.5]}, tokenizer, max_length=8)
    assert dataset["label"] == pytest.approx([-0.25, 1.5])


def test_tokenize_second_call_hits_the_cache(tokenizer, monkeypatch):
    table = {"text": ["the cache should answer this", "and this"], "label": [0, 1]}
    first = tokenize(table, tokenizer, max_length=32)
    cache_file = first.cache_files[0]["filename"]
    modified = os.stat(cache_file).st_mtime_ns

    calls = []
    original = type(tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    second = tokenize(table, tokenizer, max_length=32)
    assert second.cache_files == first.cache_files
    assert os.stat(cache_file).st_mtime_ns == modified
    assert calls == []  # read from the cache, not tokenised again
    assert second["input_ids"] == first["input_ids"]

    # another max_length or other labels are another cache entry
    shorter = tokenize(table, tokenizer, max_length=4)
    relabelled = tokenize({"text": table["text"], "label": [1, 0]}, tokenizer, max_length=32)
    assert calls  # these were tokenised
    assert len({d.cache_files[0]["filename"] for d in (first, shorter, relabelled)}) == 3
    assert all(len(ids) <= 4 for ids in shorter["input_ids"])
    assert relabelled["label"] == [1, 0]


def test_the_token_cache_key_is_the_tokenizers_content_not_the_object(tokenizer):
    """A sweep loads the tokenizer again for every trial: the same folder is the same key (so the cache answers),
    whatever the last call left in the backend; another tokenizer setting is another key and other ids."""
    from transformers import AutoTokenizer

    from finetune.backbones import load_tokenizer, resolve_text_source
    from finetune.data import tokenizer_fingerprint

    again = load_tokenizer(resolve_text_source("minilm-l6"))
    tokenizer(["warm up: a call sets the backend's truncation and padding"], truncation=True, max_length=8,
              padding="max_length")
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)
    cased = AutoTokenizer.from_pretrained(again.name_or_path, do_lower_case=False)
    assert tokenizer_fingerprint(cased) != tokenizer_fingerprint(tokenizer)
    table = {"text": ["Great Phone"], "label": [1]}
    assert tokenize(table, cased, 16)["input_ids"] != tokenize(table, tokenizer, 16)["input_ids"]


def test_tokenize_the_splits_read_from_files(tmp_path, tokenizer):
    train, validation = write_csv(tmp_path / "t.csv", TRAIN_ROWS), write_csv(tmp_path / "v.csv", VALIDATION_ROWS)
    splits = load(train=train, validation=validation)
    dataset = tokenize(splits.validation, tokenizer, max_length=32)
    assert len(dataset) == 3
    assert dataset["label"] == [0, 1, 2]
    assert dataset[0]["input_ids"] == tokenizer("bank rates rise")["input_ids"]


def test_regression_with_validation_held_out_of_train(tmp_path):
    targets = [0.5 * i for i in range(20)]
    splits = load("regression", train=write_targets(tmp_path / "t.csv", targets), val_fraction=0.25)
    train_rows = splits.info["splits"]["train"]["rows"]
    assert len(train_rows) == 15 and len(splits.validation["label"]) == 5
    raw_train = np.array([targets[r] for r in train_rows])
    assert splits.target_mean == pytest.approx(raw_train.mean())  # statistics of the kept train rows only
    assert all(math.isfinite(t) for t in splits.train["label"] + splits.validation["label"])
    raw_validation = np.array([targets[r] for r in splits.info["splits"]["validation"]["rows"]])
    np.testing.assert_allclose(splits.validation["label"], (raw_validation - raw_train.mean()) / raw_train.std())
