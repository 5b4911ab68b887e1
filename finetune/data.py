"""The split machinery the tasks share: files and hub sets read into a RawSplit, where a row came from, the held-out
validation part, the label space and encoding (asked of the problem), and the Splits a task hands the loop."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.errors import FinetuneError
from finetune.problems import NO_LABEL, get

SPLITS = ("train", "validation", "test")
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
}


@dataclass
class RawSplit:
    """Rows of one split as read, before labels are encoded."""

    texts: list[str]
    labels: list[Any]
    rows: list[Any]  # where each row came from: its index in the file, or a zoo file name
    source: str  # what to name in messages and in split.json
    row_name: str = "row"  # "line" for line-based files, so the number is the one an editor shows
    row_offset: int = 1
    path: Path | None = None  # line-based files: read again, only to name the line of a bad row
    pairs: list[Any] | None = None  # sentence pairs: each row's second text (data.text_pair_column)


@dataclass
class Splits:
    """Encoded splits plus everything needed to decode predictions (label names, target scaling)."""

    problem: str
    train: dict
    validation: dict
    test: dict | None
    label_names: list[str] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0
    info: dict = field(default_factory=dict)  # what split.json records
    parts: dict = field(default_factory=dict, repr=False)  # split name -> the RawSplit its table came from
    warnings: list = field(default_factory=list)  # legal but worth saying (the data report repeats them)


# ---------------------------------------------------------------------------------------------------------------
# Reading files and hub data sets.


def open_dataset(*args, what: str, path: Path | None = None, **kwargs):
    import datasets

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parsers log the error we raise, as extra lines
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as error:  # datasets wraps parser errors in many types; all mean "this file is unreadable"
        cause = error.__cause__ or error
        if "corresponds to no data" in str(cause):
            raise FinetuneError(f"{what}: has no data rows") from None
        message = str(cause).strip().splitlines()
        first = message[0] if message else ""
        hint = delimiter_hint(path) if path is not None else None
        if hint:
            raise FinetuneError(f"{what}: {hint}") from None
        unclosed = re.search(r"EOF inside string starting at row (\d+)", first)
        if unclosed:  # pandas counts rows from 0, the header included
            raise FinetuneError(
                f"{what}: line {int(unclosed.group(1)) + 1} opens a double quote that is never closed; close it, or "
                "double a quote inside a quoted field (\"\")"
            ) from None
        fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", first)
        if fields:
            header, line, saw = fields.groups()
            raise FinetuneError(
                f"{what}: line {line} has {saw} fields but the header has {header}; put double quotes around a "
                "field that contains the separator"
            ) from None
        raise FinetuneError(f"{what}: cannot be read ({cause.__class__.__name__}: {first})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


SEPARATORS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}


def delimiter_hint(path: Path) -> str | None:
    """Why a csv/tsv file reads as one column: its header is separated by another character than its extension's."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        return None
    with path.open(encoding="utf-8-sig", errors="replace") as file:
        header = file.readline().rstrip("\r\n")
    expected = "\t" if suffix == ".tsv" else ","
    found = max(SEPARATORS, key=header.count)
    if expected in header or not header.count(found):
        return None
    fix = "rename it to .tsv" if found == "\t" else f"re-save it {SEPARATORS[expected]}-separated"
    return (
        f"wrong delimiter: the header {header[:60]!r} is {SEPARATORS[found]}-separated, but a {suffix} file is read "
        f"{SEPARATORS[expected]}-separated, so it reads as one column; {fix}"
    )


def check_utf8(path: Path, what: str) -> None:
    """A text data file must be UTF-8 (a BOM is fine) and not blank: name the line of the first bad byte."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    lines, blank = 0, True
    with path.open("rb") as file:
        if file.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):  # Excel's "Unicode text"
            raise FinetuneError(f"{what}: is UTF-16 text; re-save the file as UTF-8")
        file.seek(0)
        while chunk := file.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                # error.start counts from the undecoded tail carried over from the last chunk (at most 3 bytes)
                start = max(0, error.start - len(decoder.getstate()[0]))
                line = lines + chunk.count(b"\n", 0, start) + 1
                raise FinetuneError(
                    f"{what}: line {line} is not UTF-8 text (byte 0x{chunk[start:start + 1].hex()}); re-save the "
                    "file as UTF-8"
                ) from None
            lines += chunk.count(b"\n")
            blank = blank and not text.replace("\ufeff", "").strip()
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise FinetuneError(f"{what}: ends inside a UTF-8 character (cut short?); re-save the file as UTF-8") from None
    if blank:
        raise FinetuneError(f"{what} is empty (only blank lines)")


def _check_json_start(path: Path, what: str) -> None:
    """Rows are JSON objects: in an array, or one per line. (pyarrow crashes the process on a file of bare nulls.)"""
    with path.open(encoding="utf-8-sig") as file:
        while (chunk := file.read(1 << 16)) and not chunk.strip():
            pass
    start = chunk.lstrip()[:20]
    if not start.startswith(("{", "[")):
        raise FinetuneError(
            f"{what}: starts with {start!r}, not a JSON object; rows are objects, one per line or in an array "
            '([{"text": ..., "label": ...}, ...])'
        )


def not_found(key: str, spec: str, zoo, expected: str) -> FinetuneError:
    """A data.* value that is no file, folder or zoo name: suggest a zoo name it looks like."""
    import difflib

    close = difflib.get_close_matches(spec, list(zoo), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return FinetuneError(f"{key}: '{spec}' not found; {hint}{expected}, a zoo name ({', '.join(zoo)}) or hub:<id>")


def load_table(path: Path, what: str):
    """A csv/tsv/json/jsonl/parquet file as a `datasets.Dataset`, or an error naming the file and what is wrong."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise FinetuneError(f"{what} is empty (0 bytes)")
    if suffix != ".parquet":
        check_utf8(path, what)
    if suffix in (".json", ".jsonl"):
        _check_json_start(path, what)
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    table = open_dataset(FILE_BUILDERS[suffix], data_files=str(path), split="train", what=what, path=path, **kwargs)
    # pandas makes a header's missing fields the index: a tab-separated row under a one-column header still "parses"
    if len([c for c in table.column_names if c != "__index_level_0__"]) == 1:
        hint = delimiter_hint(path)
        if hint:
            raise FinetuneError(f"{what}: {hint}")
    return table




def _record_lines(path: Path) -> list[int]:
    """The line each record starts on, as an editor counts: quoted csv fields span lines, blank lines are skipped."""
    suffix = path.suffix.lower()
    with path.open(newline="", encoding="utf-8", errors="replace") as file:
        if suffix == ".jsonl":
            return [number for number, line in enumerate(file, 1) if line.strip()]
        import csv

        starts, previous = [], 0
        reader = csv.reader(file, delimiter="\t" if suffix == ".tsv" else ",")
        for record in reader:
            if record:
                starts.append(previous + 1)
            previous = reader.line_num
        return starts[1:]  # the first record is the header




def table_column(path: Path, column: str, option: str) -> list[Any]:
    """One column of a csv/tsv/json/jsonl/parquet file (what `predict` reads inputs from); `option` names it."""
    suffix = path.suffix.lower()
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if path.stat().st_size == 0:
        raise FinetuneError(f"{path}: is empty")
    table = open_dataset(FILE_BUILDERS[suffix], data_files=str(path), split="train", what=str(path), **kwargs)
    require_columns(table, str(path), {option: column})
    return list(table[column])


def require_columns(table, what: str, options: dict[str, str]) -> None:
    """Every named column exists (else a did-you-mean naming the recipe key), each used once, and the table has rows."""
    import difflib

    columns = [c for c in table.column_names if c != "__index_level_0__"]  # pandas' index, not the user's column
    for option, column in options.items():
        if column not in columns:
            close = difflib.get_close_matches(column, columns, n=1)
            hint = f"did you mean {option}={close[0]}? " if close else ""
            raise FinetuneError(f"{what} has no column '{column}' ({option}); {hint}columns: {', '.join(columns)}")
    named = list(options.items())
    for i, (option, column) in enumerate(named):
        for other, same in named[i + 1:]:
            if column == same:
                raise FinetuneError(f"{option} and {other} both name column '{column}' of {what}; they must differ")
    if len(table) == 0:
        raise FinetuneError(f"{what}: has no rows")




def label_values(table, column: str, problem: str) -> list:
    """Label values, with a hub set's class indices turned into its class names (kept as numbers for regression)."""
    from datasets import ClassLabel, Sequence

    values = list(table[column])
    if not get(problem).has_labels:
        return values
    feature = table.features[column]
    inner = getattr(feature, "feature", None) if isinstance(feature, Sequence) else None
    if isinstance(feature, ClassLabel):
        return [feature.int2str(v) if v is not None and v >= 0 else None for v in values]
    if isinstance(inner, ClassLabel):
        return [[inner.int2str(v) for v in row] if row is not None else None for row in values]
    if isinstance(feature, list) and feature and isinstance(feature[0], ClassLabel):
        return [[feature[0].int2str(v) for v in row] if row is not None else None for row in values]
    return values


# ---------------------------------------------------------------------------------------------------------------
# Labels.


def where_row(split: RawSplit, position: int, lines: list[int] | None = None) -> str:
    """Where a row came from, as its user finds it: the file's line (an editor's count), its row, or its zoo name."""
    row = split.rows[position]
    if isinstance(row, int) and split.path is not None:
        lines = _record_lines(split.path) if lines is None else lines
        if row < len(lines):
            return f"{split.source} line {lines[row]}"
    if isinstance(row, int):
        return f"{split.source} {split.row_name} {row + split.row_offset}"
    return f"{split.source} ({row})"


def where_rows(split: RawSplit, positions: list[int]) -> list[str]:
    """where_row for many rows, reading a line-based file once."""
    lines = _record_lines(split.path) if split.path is not None and positions else None
    return [where_row(split, position, lines) for position in positions]


def check_labels(split: RawSplit, key: str, problem: str) -> None:
    get(problem).check_labels(split.labels, lambda i: where_row(split, i), key)


def label_space(train: RawSplit, problem: str) -> list[str] | None:
    """Label names from train, sorted (numbers numerically); None for regression."""
    return get(problem).label_space(train.labels, train.source)


def encode_labels(split: RawSplit, problem: str, names: list[str] | None, key: str) -> list:
    return get(problem).encode(split.labels, names, lambda i: where_row(split, i), key)


# ---------------------------------------------------------------------------------------------------------------
# Splitting and capping.


def stratified_split(labels: list, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) positions; each class gives its share (largest remainders), keeping one in train."""
    rng = np.random.RandomState(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(repr(label), []).append(i)
    total = max(1, round(len(labels) * fraction))
    groups = [rng.permutation(members).tolist() for _, members in sorted(by_class.items())]
    shares = [len(g) * fraction for g in groups]
    counts = [min(math.floor(s), len(g) - 1) for s, g in zip(shares, groups)]
    for j in sorted(range(len(groups)), key=lambda j: shares[j] - math.floor(shares[j]), reverse=True):
        if sum(counts) >= total:
            break
        if counts[j] < len(groups[j]) - 1:
            counts[j] += 1
    held = sorted(i for g, c in zip(groups, counts) for i in g[:c])
    if not held:
        raise FinetuneError(
            "data.validation: too few training rows to hold some out for validation; give data.validation a file"
        )
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], held


def subset_rows(split: RawSplit, positions: list[int]) -> RawSplit:
    return RawSplit(
        [split.texts[i] for i in positions],
        [split.labels[i] for i in positions],
        [split.rows[i] for i in positions],
        split.source,
        split.row_name,
        split.row_offset,
        split.path,
        None if split.pairs is None else [split.pairs[i] for i in positions],
    )


def cap_rows(split: RawSplit, max_samples: int | None, seed: int) -> RawSplit:
    if max_samples is None or len(split.texts) <= max_samples:
        return split
    keep = sorted(np.random.RandomState(seed).permutation(len(split.texts))[:max_samples].tolist())
    return subset_rows(split, keep)




# ---------------------------------------------------------------------------------------------------------------
# Few labels: N rows per class.


def per_class_positions(classes: list[list[str]], n: int, seed: int) -> tuple[list[int], dict[str, int]]:
    """(positions of n rows per class in file order, {class: rows} of the classes that had fewer and keep all).

    `classes[i]`: the classes row i counts for. Greedy, rarest class first, in one seeded order of the rows: each
    class is topped up to n rows holding it, counting the rows already taken for other classes. A row of one class
    (single_label) makes it exactly n per class; a row of several (multi_label, a sentence's entity types) gives
    every class at least n and the common ones more, in far fewer rows than n per class taken apart.
    """
    holding: dict[str, list[int]] = {}
    for i in np.random.RandomState(seed).permutation(len(classes)).tolist():
        for name in classes[i]:
            holding.setdefault(name, []).append(i)
    taken: set[int] = set()
    counts = dict.fromkeys(holding, 0)
    for name in sorted(holding, key=lambda c: (len(holding[c]), c)):
        for i in holding[name]:
            if counts[name] >= n:
                break
            if i not in taken:
                taken.add(i)
                for other in classes[i]:
                    counts[other] += 1
    return sorted(taken), {name: len(rows) for name, rows in holding.items() if len(rows) < n}


def keep_per_class(parts: dict, recipe) -> list[str]:
    """data.train_per_class / data.validation_per_class: those splits cut to N rows per class (the problem says what
    a row's classes are), seeded by train.seed. Validation is held out before, so no row is in both. A class with
    fewer than N rows is an error (a curve's point at N would silently not be N per class); rows without a label
    or entity keep all they have, and the returned warning says so."""
    d, warnings = recipe.data, []
    for key, n in (("train", d.train_per_class), ("validation", d.validation_per_class)):
        split = parts.get(key)
        if n is None or split is None:
            continue
        classes = [get(recipe.head.problem).row_classes(value) for value in split.labels]
        kept, short = per_class_positions(classes, n, recipe.train.seed)
        unlabelled = short.pop(NO_LABEL, None)
        if short:
            name, count = min(short.items(), key=lambda item: (item[1], item[0]))
            more = f" ({len(short) - 1} other class(es) too)" if len(short) > 1 else ""
            raise FinetuneError(f"data.{key}_per_class: {n} rows per class asked, but class '{name}' of "
                                f"{split.source} has only {count}{more}; use data.{key}_per_class: {count} or less")
        parts[key] = subset_rows(split, kept)
        if unlabelled is not None:
            warnings.append(f"data.{key}_per_class: {n} rows per class asked, but {split.source} has only "
                            f"{unlabelled} rows without a label; all of them are kept")
    return warnings


def per_class_info(recipe) -> dict:
    """What split.json says of the per-class cut (the rows themselves are each split's `rows`)."""
    d = recipe.data
    wanted = {key: n for key, n in (("train", d.train_per_class), ("validation", d.validation_per_class)) if n}
    return {"per_class": wanted | {"seed": recipe.train.seed}} if wanted else {}


def check_per_class(recipe, need) -> None:
    """data.*_per_class: a positive count, for a problem whose rows have classes."""
    refusal = get(recipe.head.problem).few_label_refusal()
    for key in ("train_per_class", "validation_per_class"):
        n = getattr(recipe.data, key)
        if n is not None:
            need(n >= 1, f"data.{key}: must be at least 1 row per class, or null for every row; got {n}")
            need(refusal is None, f"data.{key}: {refusal}; use data.max_samples to cap the rows")


def per_class_note(recipe) -> str:
    """The card's words on a per-class cut of the training rows."""
    n = recipe.data.train_per_class
    seed = recipe.train.seed
    return "" if n is None else f" {n} rows per class of it were kept (`data.train_per_class`, seed {seed})."


def read_parts(recipe, read) -> dict[str, RawSplit | None]:
    """The train, validation and test parts as data.* names them: a set's own splits, replaced by the files given."""
    d = recipe.data
    given = read(d.train, recipe, "data.train")
    train = given.get("train") or given.get("file")
    if train is None:
        raise FinetuneError(f"data.train: '{d.train}' has no 'train' split (it has: {', '.join(given)})")
    parts: dict[str, RawSplit | None] = {
        "train": train, "validation": given.get("validation"), "test": given.get("test")
    }
    for key in ("validation", "test"):
        spec = getattr(d, key)
        if spec is not None:
            found = read(spec, recipe, f"data.{key}")
            parts[key] = found.get(key) or found.get("file") or found.get("train")
    return parts


def assemble_splits(recipe, read, input_name: str, check_inputs, skipped_as: str = "skipped") -> Splits:
    """The split rules shared by every modality.

    `read(spec, recipe, key)` gives the split(s) a data.* value names; `check_inputs(split, key)` checks (or drops,
    returning what it skipped, recorded in split.json under `skipped_as`) the inputs that will be used. The label
    space comes from all of train (sorted); a validation/test label unseen in train is an error; data.validation null
    holds a stratified data.val_fraction of train out (seeded by train.seed); data.max_samples caps each split; tables
    are {input_name, "label", "row"}.
    """
    d, problem = recipe.data, recipe.head.problem
    parts = read_parts(recipe, read)
    train = parts["train"]
    for key, split in parts.items():  # train whole, before a validation part is held out of it
        if split is not None:
            check_labels(split, f"data.{key}", problem)
    held_out_from_train = parts["validation"] is None
    if held_out_from_train:
        kept, held = stratified_split(get(problem).strata(train.labels), d.val_fraction, recipe.train.seed)
        parts["train"], parts["validation"] = subset_rows(train, kept), subset_rows(train, held)

    names = label_space(parts["train"], problem)  # from all of train, before any max_samples cap
    few = keep_per_class(parts, recipe)
    skipped: dict[str, list[str]] = {}
    for key in SPLITS:
        if parts[key] is not None:
            parts[key] = cap_rows(parts[key], d.max_samples, recipe.train.seed)
            parts[key], skipped[key] = check_inputs(parts[key], f"data.{key}")

    encoded = {key: split and encode_labels(split, problem, names, f"data.{key}") for key, split in parts.items()}
    encoded, mean, std = get(problem).standardise(encoded)
    tables = {
        key: None if split is None else {
            input_name: split.texts, "label": encoded[key], "row": split.rows,
            **({} if split.pairs is None else {"text_pair": split.pairs}),
        }
        for key, split in parts.items()
    }
    info = {
        "problem": problem,
        "labels": names,
        **get(problem).split_info(mean, std),
        "validation_held_out_from_train": held_out_from_train,
        **per_class_info(recipe),
        "splits": {
            key: {
                "source": split.source,
                "count": len(split.rows),
                "rows": split.rows,
                **({skipped_as: skipped[key]} if skipped.get(key) else {}),
            }
            for key, split in parts.items()
            if split is not None
        },
    }
    kept = {key: split for key, split in parts.items() if split is not None}
    return Splits(problem, tables["train"], tables["validation"], tables["test"], names, mean, std, info, kept, few)


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation and loaders.


def tokenizer_fingerprint(tokenizer) -> str:
    """What a tokenizer's output depends on, hashed in milliseconds: a fast tokenizer's whole pipeline (its
    tokenizer.json: vocabulary, normaliser, special-token template) and its Python-side settings. datasets' Hasher
    pickles the whole object instead (~0.1 s a call, three calls a run: a third of a cached probe trial); it stays
    the key of a tokenizer without a Rust backend."""
    import hashlib
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        from datasets.fingerprint import Hasher

        return Hasher.hash(tokenizer)
    # the truncation and padding the last call left in the backend are not part of it: every call sets its own
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    digest = hashlib.sha256()
    for part in (f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}", repr(tokenizer),
                 json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str), backend.to_str()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()




