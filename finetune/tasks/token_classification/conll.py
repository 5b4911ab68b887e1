"""Reading tagged sentences: CoNLL files and tables of word/tag lists, checked, split and encoded.

A split is a `finetune.data.RawSplit` whose `texts` are the sentences' word lists and whose `labels` are their tag
lists, so `data.subset`, `data.cap` and `data.where_rows` work on it unchanged. A CoNLL file's rows are the line
numbers its sentences start on (`row_name` "line", `row_offset` 0, no `path`); a table's rows are its row indices, as
`finetune.data` reads any table.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data import (
    FILE_BUILDERS,
    SPLITS,
    RawSplit,
    Splits,
    cap_rows,
    check_utf8,
    keep_per_class,
    label_values,
    load_table,
    open_dataset,
    per_class_info,
    read_parts,
    require_columns,
    stratified_split,
    subset_rows,
    where_row,
    where_rows,
)
from finetune.errors import FinetuneError
from finetune.label_cells import value_kind
from finetune.tasks.token_classification.tags import OUTSIDE, tag_scheme

CONLL_SUFFIXES = (".conll", ".txt", ".iob")
DOCSTART = "-DOCSTART-"
SHOWN_TAGS = 20  # tags listed in a message; the rest as "..."
SNIPPET = 40


def read_split(spec: str, recipe, key: str) -> dict[str, RawSplit]:
    """The split(s) a data.train/validation/test value names (a CoNLL file, a table or hub:<id>), keyed by split name.

    Same contract as `finetune.data.read_split` (a file gives {"file": split}), so `assemble_splits` can take it;
    columns come from `recipe.data.tokens_column` and `recipe.data.tags_column`.
    """
    d = recipe.data
    if spec.startswith("hub:"):
        tables = open_dataset(spec[len("hub:"):], what=f"{key}: '{spec}'")
        splits = {}
        for name, table in tables.items():
            split = {"valid": "validation", "val": "validation", "dev": "validation"}.get(name, name)
            what = f"{key}: '{spec}' split '{name}'"
            splits[split] = split_from_table(table, what, d.tokens_column, d.tags_column)
        return splits
    return {"file": read_file(spec, key, d.tokens_column, d.tags_column)}


def read_file(spec: str, key: str, tokens_column: str = "tokens", tags_column: str = "tags") -> RawSplit:
    """A CoNLL file (.conll/.txt/.iob) or a csv/tsv/json/jsonl/parquet table of word lists and tag lists."""
    path = Path(spec).expanduser()
    kinds = (
        f"token data is a CoNLL file ({'/'.join(CONLL_SUFFIXES)}) or a {'/'.join(s[1:] for s in FILE_BUILDERS)} table"
    )
    if not path.exists():
        raise FinetuneError(f"{key}: '{spec}' not found; {kinds}")
    if path.is_dir():
        raise FinetuneError(f"{key}: '{spec}' is a directory; {kinds}")
    suffix = path.suffix.lower()
    what = f"{key}: '{spec}'"
    if suffix in CONLL_SUFFIXES:
        return read_conll(path, what)
    if suffix not in FILE_BUILDERS:
        raise FinetuneError(f"{key}: '{spec}' has an unknown extension; {kinds}")
    table = load_table(path, what)
    line_based = suffix in (".csv", ".tsv", ".jsonl")
    try:
        return split_from_table(table, what, tokens_column, tags_column, "line" if line_based else "row", 1,
                                path if line_based else None)
    except FinetuneError as error:
        if suffix in (".csv", ".tsv") and tokens_column not in table.column_names:  # CoNLL lines under a table name
            raise FinetuneError(f"{error}; a file of one word and its tag per line is CoNLL: name it .conll") from None
        raise


def read_conll(path: Path, what: str) -> RawSplit:
    """Sentences of a CoNLL file: the word in the first column, the tag in the last, a blank line between sentences.

    `-DOCSTART-` lines end a sentence and are skipped; a last sentence without a blank line after it is kept. Each
    row is the line number of the sentence's first word, so word j of sentence i is on line rows[i] + j.
    """
    if path.stat().st_size == 0:
        raise FinetuneError(f"{what} is empty (0 bytes)")
    check_utf8(path, what)
    words: list[list[str]] = []
    tags: list[list[str]] = []
    rows: list[int] = []
    sentence_words: list[str] = []
    sentence_tags: list[str] = []

    def close(first_line: int) -> None:
        if sentence_words:
            words.append(list(sentence_words))
            tags.append(list(sentence_tags))
            rows.append(first_line)
            sentence_words.clear()
            sentence_tags.clear()

    first = 0
    with path.open(encoding="utf-8-sig") as file:
        for number, line in enumerate(file, 1):
            fields = line.split()
            if not fields or fields[0] == DOCSTART:
                close(first)
                continue
            if len(fields) == 1:
                raise FinetuneError(
                    f"{what} line {number}: {_quoted(fields[0])} has no tag column; write each word and its tag on "
                    "one line, separated by a space or tab (e.g. 'Paris B-LOC'), with a blank line between sentences"
                )
            if not sentence_words:
                first = number
            sentence_words.append(fields[0])
            sentence_tags.append(fields[-1])
    close(first)
    if not words:
        raise FinetuneError(f"{what} has no sentences (only {DOCSTART} and blank lines)")
    return RawSplit(words, tags, rows, what.split(": ", 1)[-1], row_name="line", row_offset=0, path=None)


def split_from_table(table, what: str, tokens_column: str = "tokens", tags_column: str = "tags",
                     row_name: str = "row", row_offset: int = 1, path: Path | None = None) -> RawSplit:
    """Word lists and tag lists from two table columns (lists, or list literals in csv cells); a hub set's tag indices
    become its tag names."""
    require_columns(table, what, {"data.tokens_column": tokens_column, "data.tags_column": tags_column})
    split = RawSplit([], [], list(range(len(table))), what.split(": ", 1)[-1], row_name, row_offset, path)
    tag_cells = label_values(table, tags_column, "tags")
    for i, (word_cell, tag_cell) in enumerate(zip(table[tokens_column], tag_cells)):
        words = _cell_list(word_cell, split, i, tokens_column, "words")
        tags = _cell_list(tag_cell, split, i, tags_column, "tags")
        if len(words) != len(tags):
            more = "more" if len(tags) > len(words) else "fewer"
            raise FinetuneError(
                f"{where_row(split, i)}: {len(tags)} tags for {len(words)} words ({more} tags than words in column "
                f"'{tags_column}'); give exactly one tag per word of column '{tokens_column}'"
            )
        split.texts.append(words)
        split.labels.append(tags)
    return split


def _cell_list(value: Any, split: RawSplit, position: int, column: str, what: str) -> list[str]:
    """A cell as a list of non-empty strings: a list, or a JSON / Python list literal (parsed, never evaluated)."""
    example = '["EU", "rejects", "German"]' if what == "words" else '["B-ORG", "O", "B-MISC"]'
    if isinstance(value, str) and value.strip().startswith(("[", "(")):
        text = value.strip()
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)  # Python's repr of a list: single quotes; literals only, no code
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise FinetuneError(
                    f"{where_row(split, position)}: column '{column}' holds {_quoted(text)}, which is not a readable "
                    f"list; write the {what} as a JSON list such as {example}"
                ) from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        kind = "nothing" if value is None or (isinstance(value, float) and math.isnan(value)) else value_kind(value)
        shown = "" if kind == "nothing" else f" ({_quoted(value)})"
        raise FinetuneError(
            f"{where_row(split, position)}: column '{column}' holds {kind}{shown}, not a list of {what}; write the "
            f"{what} as a list such as {example}"
        )
    items = []
    for j, item in enumerate(value):
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (str, int, float, np.number)):
            raise FinetuneError(
                f"{where_row(split, position)}: item {j + 1} of column '{column}' is {value_kind(item)}, not text; "
                f"the {what} must be strings, as in {example}"
            )
        if isinstance(item, float) and item.is_integer():
            item = int(item)  # pandas turns ints with a gap into floats
        text = str(item).strip()
        if not text:
            raise FinetuneError(
                f"{where_row(split, position)}: item {j + 1} of column '{column}' is empty; every one of the {what} "
                "needs some text"
            )
        items.append(text)
    return items


def load_splits(recipe) -> Splits:
    """Read, check, split and encode the recipe's tagged sentences: `Splits` with problem 'tags'; no model needed.

    The rules of `finetune.data.assemble_splits`: data.validation null holds a data.val_fraction of train out (seeded
    by train.seed; sentences are not stratified), the tag set comes from train (before data.max_samples caps each
    split), a validation/test tag unseen in train is an error naming its line, empty sentences are dropped and
    listed. Tables are {"tokens": word lists, "label": tag id lists, "row": rows}; split.json's info adds "scheme".
    """
    d = recipe.data
    parts = read_parts(recipe, read_split)
    train = parts["train"]
    held_out_from_train = parts["validation"] is None
    if held_out_from_train:
        kept, held = stratified_split([0] * len(train.texts), d.val_fraction, recipe.train.seed)
        parts["train"], parts["validation"] = subset_rows(train, kept), subset_rows(train, held)
    names = tag_names(parts["train"])  # from all of train, before the per-class cut
    few = keep_per_class(parts, recipe)
    skipped: dict[str, list[str]] = {}
    for key in SPLITS:
        if parts[key] is not None:
            parts[key] = cap_rows(parts[key], d.max_samples, recipe.train.seed)
            parts[key], skipped[key] = check_sentences(parts[key], f"data.{key}")
    tables = {
        key: None if split is None else
        {"tokens": split.texts, "label": encode_tags(split, names, f"data.{key}"), "row": split.rows}
        for key, split in parts.items()
    }
    info = {
        "problem": "tags",
        "labels": names,
        "scheme": tag_scheme(names),
        "validation_held_out_from_train": held_out_from_train,
        **per_class_info(recipe),
        "splits": {
            key: {"source": split.source, "count": len(split.rows), "rows": split.rows,
                  **({"skipped": skipped[key]} if skipped.get(key) else {})}
            for key, split in parts.items() if split is not None
        },
    }
    kept_parts = {key: split for key, split in parts.items() if split is not None}
    return Splits("tags", tables["train"], tables["validation"], tables["test"], names, info=info, parts=kept_parts,
                  warnings=few)


def check_sentences(split: RawSplit, key: str) -> tuple[RawSplit, list[str]]:
    """Sentences with no words carry no signal and are dropped (split.json lists them); all empty is an error.

    The `check_inputs` of `finetune.data.assemble_splits`.
    """
    empty = [i for i, words in enumerate(split.texts) if not words]
    if not empty:
        return split, []
    if len(empty) == len(split.texts):
        raise FinetuneError(f"{key}: every sentence of {split.source} is empty; check data.tokens_column")
    dropped = set(empty)
    kept = subset_rows(split, [i for i in range(len(split.texts)) if i not in dropped])
    return kept, [f"{where}: empty sentence" for where in where_rows(split, empty)]


def is_conll(split: RawSplit) -> bool:
    """True for a split read from a CoNLL file: its rows are line numbers."""
    return split.row_name == "line" and split.path is None and split.row_offset == 0


def where_word(split: RawSplit, sentence: int, word: int) -> str:
    """Where a word is, as its user finds it: its CoNLL line, or its table row and position."""
    if is_conll(split):
        return f"{split.source} line {split.rows[sentence] + word}"
    return f"{where_row(split, sentence)} word {word + 1}"


def leakage_key(words: Sequence[str]) -> str:
    """What makes two sentences the same for the leakage check: their words, whatever the tags."""
    return " ".join(words)


def tag_names(train: RawSplit) -> list[str]:
    """The tags of the training sentences: sorted, 'O' first."""
    names = {tag for tags in train.labels for tag in tags}
    ordered = ([OUTSIDE] if OUTSIDE in names else []) + sorted(names - {OUTSIDE})
    if len(ordered) < 2:
        raise FinetuneError(
            f"{train.source}: every training word has the tag {ordered[0]!r}; a tagger needs two or more tags"
        )
    return ordered


def encode_tags(split: RawSplit, names: list[str], key: str) -> list[list[int]]:
    """Each sentence's tags as ids into `names`; a tag not seen in train is an error naming its line."""
    index = {name: i for i, name in enumerate(names)}
    encoded = []
    for i, tags in enumerate(split.labels):
        for j, tag in enumerate(tags):
            if tag not in index:
                shown = ", ".join(names[:SHOWN_TAGS]) + (", ..." if len(names) > SHOWN_TAGS else "")
                raise FinetuneError(
                    f"{key}: tag '{tag}' at {where_word(split, i, j)} (word {_quoted(split.texts[i][j])}) is not in "
                    f"the training tags ({shown}); add training sentences with it, or retag those words"
                )
        encoded.append([index[tag] for tag in tags])
    return encoded


def _quoted(value: Any) -> str:
    text = " ".join(str(value).split())
    return repr(text if len(text) <= SNIPPET else text[: SNIPPET - 3] + "...")
