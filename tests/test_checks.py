"""checks: the data report `validate` prints — counts, imbalance, missing classes, leakage, blank texts, truncation,
token limits, unreadable and duplicate images, output.dir — on real files, the tiny BERT's tokenizer and real images."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import to_recipe
from PIL import Image

from finetune.checks import IMBALANCE_RATIO, check_data, data_report
from finetune.errors import FinetuneError


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets-cache")


def words(n: int, seed: int = 0) -> str:
    """n words of the tiny vocabulary (one token each), distinct per seed."""
    pool = ["the", "a", "of", "and", "today", "very", "news", "story"]
    return " ".join(pool[(seed * 7 + i * (seed % 5 + 1)) % len(pool)] for i in range(n - 1)) + f" w{seed}"


def table(path: Path, rows: list[tuple]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["sentence", "topic"])
        writer.writerows(rows)
    return path


def rows_of(counts: dict[str, int], start: int = 0) -> list[tuple[str, str]]:
    rows, seed = [], start
    for label, count in counts.items():
        for _ in range(count):
            rows.append((words(4, seed), label))
            seed += 1
    return rows


@pytest.fixture
def report(make_recipe, tmp_path):
    """report(train_rows, validation_rows, test_rows=None, **dotted) -> check_data on those CSVs and the tiny BERT."""

    def build(train, validation, test=None, **dotted):
        data = {
            "data.train": str(table(tmp_path / "train.csv", train)),
            "data.validation": str(table(tmp_path / "validation.csv", validation)),
            "data.test": str(table(tmp_path / "test.csv", test)) if test is not None else None,
        }
        return check_data(to_recipe(make_recipe(**{**data, **dotted})))

    return build


BALANCED = {"food": 4, "sports": 4, "tech": 4}


# ---------------------------------------------------------------------------------------------------------------
# Counts and the table.


def test_counts_per_split_and_a_clean_set_has_no_warnings(report):
    result = report(rows_of(BALANCED), rows_of({"food": 2, "sports": 1, "tech": 1}, 100), rows_of(BALANCED, 200))
    assert result.warnings == []
    assert {key: s.rows for key, s in result.splits.items()} == {"train": 12, "validation": 4, "test": 12}
    assert result.splits["validation"].counts == {"food": 2, "sports": 1, "tech": 1}
    lines = result.table().splitlines()
    assert any(line.split() == ["food", "4", "2", "4"] for line in lines), result.table()
    assert any(line.split()[:3] == ["validation", "4", "0"] for line in lines)


def test_imbalance_above_the_ratio_warns_and_at_the_ratio_does_not(report):
    at_ratio = int(IMBALANCE_RATIO * 10)
    result = report(rows_of({"food": at_ratio, "tech": 10}), rows_of({"food": 1, "tech": 1}, 500))
    assert not any("imbalanced" in w for w in result.warnings)
    skewed = report(rows_of({"food": at_ratio + 1, "tech": 10}), rows_of({"food": 1, "tech": 1}, 500))
    (warning,) = [w for w in skewed.warnings if "imbalanced" in w]
    assert f"'food' has {at_ratio + 1} rows, 'tech' 10" in warning and warning.startswith("data.train:")


def test_classes_missing_from_validation_and_test_are_named(report):
    result = report(rows_of(BALANCED), rows_of({"food": 1, "sports": 1}, 100), rows_of({"food": 2}, 200))
    assert "data.validation: no rows of class 'tech' (1 of 3 classes)" in "\n".join(result.warnings)
    assert "data.test: no rows of classes 'sports', 'tech' (2 of 3 classes)" in "\n".join(result.warnings)


# ---------------------------------------------------------------------------------------------------------------
# Leakage and label noise.


def test_leakage_counts_rows_identical_to_training_rows_and_names_both_lines(report, tmp_path):
    train = rows_of(BALANCED)
    validation = rows_of({"food": 2, "sports": 2, "tech": 2}, 100)
    validation[3] = (train[5][0] + "  ", train[5][1])  # trailing whitespace is still the same text
    test = rows_of(BALANCED, 200)
    test[0], test[7] = train[0], train[11]
    result = report(train, validation, test)
    assert result.splits["validation"].in_train == 1 and result.splits["test"].in_train == 2
    leaks = [w for w in result.warnings if w.startswith("leakage")]
    assert len(leaks) == 2
    assert "1 of 6 data.validation rows (17%)" in leaks[0]
    assert f"'{tmp_path / 'validation.csv'}' line 5 = '{tmp_path / 'train.csv'}' line 7" in leaks[0]
    assert "2 of 12 data.test rows" in leaks[1]


def test_no_leakage_warning_for_distinct_texts(report):
    result = report(rows_of(BALANCED), rows_of(BALANCED, 100), rows_of(BALANCED, 200))
    assert not [w for w in result.warnings if "leakage" in w]
    assert result.splits["test"].in_train == 0


def test_the_same_text_with_two_labels_in_train_warns(report, tmp_path):
    train = rows_of(BALANCED)
    train.append((train[0][0], "tech"))  # the first row is food
    result = report(train, rows_of(BALANCED, 100))
    (warning,) = [w for w in result.warnings if "different label" in w]
    assert f"'{tmp_path / 'train.csv'}' line 2 ('food')" in warning and "line 14 ('tech')" in warning


def test_a_label_column_of_ids_warns(report):
    train = [(words(4, i), f"id-{i}") for i in range(30)]
    result = report(train, train[:3])
    assert any("30 classes in 30 rows" in w and "data.label_column" in w for w in result.warnings)


# ---------------------------------------------------------------------------------------------------------------
# Texts: blank rows, token lengths.


def test_whitespace_texts_are_dropped_counted_and_the_first_line_named(report, tmp_path):
    train = rows_of(BALANCED)
    train[2] = ("   ", "food")
    train[6] = ("", "sports")
    result = report(train, rows_of(BALANCED, 100))
    assert result.splits["train"].rows == 10 and len(result.splits["train"].skipped) == 2
    (warning,) = [w for w in result.warnings if "empty" in w]
    assert warning.startswith("data.train: 2 empty or blank text(s) dropped, first ")
    assert f"'{tmp_path / 'train.csv'}' line 4" in warning
    assert any(line.split()[:3] == ["train", "10", "2"] for line in result.table().splitlines())


def test_token_percentiles_and_truncation_counts(report):
    # n words are n + 2 tokens ([CLS] ... [SEP]); lengths 4..23 tokens over 20 rows, max_length 16
    train = [(words(n, n), ["food", "tech"][n % 2]) for n in range(2, 22)]
    result = report(train, [(words(30, 1), "food"), (words(3, 2), "tech")], **{"data.max_length": 16})
    tokens = result.splits["train"].tokens
    lengths = np.arange(4, 24)
    assert tokens == {
        "p50": int(np.percentile(lengths, 50, method="higher")),
        "p90": int(np.percentile(lengths, 90, method="higher")),
        "p99": 23,
        "max": 23,
        "truncated": 7,  # 17..23
    }
    assert result.splits["validation"].tokens["truncated"] == 1 and result.splits["validation"].tokens["max"] == 32
    (warning,) = [w for w in result.warnings if "truncated" in w]
    assert "35% of train (7), 50% of validation (1) texts are longer than 16 tokens" in warning
    assert "tokens (max_length 16)" in result.table()


def test_no_truncation_warning_when_a_few_texts_are_cut(report):
    train = [(words(4, n), ["food", "tech"][n % 2]) for n in range(20)] + [(words(30, 99), "food")]
    result = report(train, rows_of({"food": 1, "tech": 1}, 100), **{"data.max_length": 16})
    assert result.splits["train"].tokens["truncated"] == 1
    assert not [w for w in result.warnings if "truncated" in w]  # 1 of 21 is under the warning's 10%


def test_max_length_beyond_the_backbone_positions_is_an_error_only_when_a_text_needs_them(report):
    # the tiny BERT has 64 positions
    short = report(rows_of(BALANCED), rows_of(BALANCED, 100), **{"data.max_length": 100})
    assert short.splits["train"].tokens["max"] == 6
    long_train = rows_of(BALANCED) + [(words(70, 1000), "food")]
    with pytest.raises(FinetuneError, match=r"data.max_length: 100 tokens is more than backbone .* \(64\).*72"):
        report(long_train, rows_of(BALANCED, 100), **{"data.max_length": 100})


# ---------------------------------------------------------------------------------------------------------------
# Regression and multi-label.


def test_regression_reports_targets_in_their_units_and_warns_on_a_constant_target(report):
    train = [(words(4, i), 10.0 + i) for i in range(5)]
    result = report(train, train[:2], **{"head.problem": "regression"})
    assert result.splits["train"].targets == pytest.approx({"mean": 12.0, "std": np.std([10, 11, 12, 13, 14]),
                                                             "min": 10.0, "max": 14.0})
    assert "target" in result.table() and "12" in result.table()
    constant = report([(words(4, i), 3.0) for i in range(4)], [(words(4, 9), 3.0)], **{"head.problem": "regression"})
    assert any("every regression target is 3" in w for w in constant.warnings)


def test_multi_label_counts_rows_per_label_and_rows_without_one(report):
    train = [(words(4, 0), "food|tech"), (words(4, 1), "food"), (words(4, 2), ""), (words(4, 3), "tech")]
    result = report(train, train[:2], **{"head.problem": "multi_label"})
    assert result.splits["train"].counts == {"food": 2, "tech": 2} and result.splits["train"].unlabelled == 1
    assert any(line.split() == ["(no", "label)", "1", "0"] for line in result.table().splitlines())


# ---------------------------------------------------------------------------------------------------------------
# output.dir and the backbone.


def test_output_dir_that_is_a_file_or_under_a_file_is_an_error_and_an_existing_run_a_warning(report, tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(FinetuneError, match="output.dir"):
            report(rows_of(BALANCED), rows_of(BALANCED, 100), **{"output.dir": str(out)})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text("{}")
    result = report(rows_of(BALANCED), rows_of(BALANCED, 100), **{"output.dir": str(tmp_path / "old")})
    assert any("already holds a run" in w and "--overwrite" in w for w in result.warnings)


def test_an_unknown_text_backbone_is_an_error(report, tmp_path):
    with pytest.raises(FinetuneError, match="backbone.name"):
        report(rows_of(BALANCED), rows_of(BALANCED, 100), **{"backbone.name": str(tmp_path / "no-such-model")})


def test_data_report_on_loaded_splits_matches_check_data(make_recipe, tmp_path):
    from finetune.tasks.text_classification.reading import load_text_splits as load_splits

    train = rows_of({"food": 30, "tech": 2})
    recipe = to_recipe(make_recipe(**{"data.train": str(table(tmp_path / "t.csv", train)), "data.validation": None,
                                      "data.test": None}))
    splits = load_splits(recipe)
    assert data_report(recipe, splits).warnings == check_data(recipe).warnings
    assert any("imbalanced" in w for w in data_report(recipe, splits).warnings)


# ---------------------------------------------------------------------------------------------------------------
# Image folders.


def save_png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
    return path


def image_recipe(tmp_path, **data):
    return to_recipe({
        "task": "image-classification",
        "backbone": {"name": "test_efficientnet", "pretrained": False},
        "data": {key: str(value) if isinstance(value, Path) else value for key, value in data.items()},
        "output": {"dir": str(tmp_path / "run")},
    })


def test_image_folder_report_counts_warns_on_imbalance_missing_class_leakage_and_skipped_files(tmp_path):
    train, validation = tmp_path / "train", tmp_path / "validation"
    for i in range(22):
        save_png(train / "cat" / f"{i:02d}.png", i)
    for i in range(2):
        save_png(train / "dog" / f"{i:02d}.png", 100 + i)
    (train / "dog" / "zero.png").write_bytes(b"")
    save_png(validation / "cat" / "fresh.png", 500)
    shutil.copy(train / "cat" / "03.png", validation / "cat" / "renamed-copy.png")  # same bytes, another name
    result = check_data(image_recipe(tmp_path, train=train, validation=validation, skip_bad_images=True))
    assert result.splits["train"].counts == {"cat": 22, "dog": 2}
    assert result.splits["validation"].counts == {"cat": 2, "dog": 0}
    assert result.splits["validation"].in_train == 1
    text = "\n".join(result.warnings)
    assert "classes are imbalanced (11x): 'cat' has 22 rows, 'dog' 2" in text
    assert "data.validation: no rows of class 'dog'" in text
    assert "1 of 2 data.validation rows (50%)" in text
    assert f"'{validation / 'cat' / 'renamed-copy.png'}' = '{train / 'cat' / '03.png'}'" in text
    assert "data.train: 1 unreadable image(s) skipped" in text and "zero.png" in text
    assert "tokens" not in result.table() and "cat" in result.table()


def test_a_zero_byte_image_without_skipping_is_an_error_naming_the_file(tmp_path):
    train = tmp_path / "train"
    for label in ("a", "b"):
        for i in range(3):
            save_png(train / label / f"{i}.png", i + 10 * ord(label))
    (train / "b" / "zero.png").write_bytes(b"")
    with pytest.raises(FinetuneError, match=r"zero\.png.*empty \(0 bytes\)"):
        check_data(image_recipe(tmp_path, train=train))


def test_an_unknown_timm_name_is_an_error_before_any_model_is_built(tmp_path):
    train = tmp_path / "train"
    for label in ("a", "b"):
        for i in range(3):
            save_png(train / label / f"{i}.png", i + 10 * ord(label))
    recipe = image_recipe(tmp_path, train=train)
    recipe.backbone.name = "resnet5O"
    with pytest.raises(FinetuneError, match="backbone.name: 'resnet5O' is not a zoo name"):
        check_data(recipe)


@pytest.mark.slow
def test_the_quickstart_recipe_report():
    from finetune.recipe import find_recipe, load_recipe

    result = check_data(load_recipe(find_recipe("text/minilm-bbc-news")))
    assert {key: s.rows for key, s in result.splits.items()} == {"train": 1701, "validation": 213, "test": 212}
    assert sum(result.splits["train"].counts.values()) == 1701
    # the test article that differed from a training one only in whitespace (sports/438 = 432) is out of the zoo's
    # test split: the quickstart's first validate warns of no leakage
    assert [w for w in result.warnings if w.startswith("leakage")] == []
    assert result.splits["train"].tokens["p50"] > result.max_length
    (cut,) = [w for w in result.warnings if w.startswith("data.max_length")]  # the recipe's choice, explained
    assert "the model reads each text's first 64 tokens" in cut and "minilm-l6 takes up to 512" in cut


@pytest.mark.parametrize(
    "augment, train, expected",
    [({"auto_augment": "randaugment-strong"}, {}, "augment.auto_augment: 'randaugment-strong'"),
     ({"mixup": 0.2}, {"batch_size": 7}, "train.batch_size: mixup/cutmix")],
)
def test_the_augment_section_is_checked_without_a_model(tmp_path, augment, train, expected):
    folder = tmp_path / "train"
    for label in ("a", "b"):
        for i in range(3):
            save_png(folder / label / f"{i}.png", i + 10 * ord(label))
    raw = {
        "task": "image-classification",
        "backbone": {"name": "test_efficientnet", "pretrained": False},
        "data": {"train": str(folder)},
        "augment": augment,
        "train": train,
        "output": {"dir": str(tmp_path / "run")},
    }
    with pytest.raises(FinetuneError, match=expected):
        check_data(to_recipe(raw))


def test_multi_label_counts_hold_for_rows_without_any_label():
    """A label-less multi-label set has an empty label space: its report counts nothing (it raised a numpy reshape
    error once the counting moved into the problem)."""
    from finetune.problems import get

    problem = get("multi_label")
    assert problem.label_counts([[], [], []], 0) == []
    assert problem.label_counts([], 2) == [0, 0]
    assert problem.label_counts([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], 2) == [2, 1]
