"""Data checks: what `validate` (and `run`, first) reports about a recipe's data, before any model is built."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data import SPLITS, RawSplit, Splits, where_rows
from finetune.errors import FinetuneError
from finetune.problems import get

# Largest / smallest training class count above which the report warns. At 10x a model that ignores the small class
# still scores >= 0.9 accuracy, which is where accuracy stops telling a good model from a useless one.
IMBALANCE_RATIO = 10.0
# Warn about truncation when more than this fraction of a split's texts is longer than data.max_length: a few long
# outliers are normal, a tenth of the data losing its end is a choice the user should make knowingly.
TRUNCATION_WARNING = 0.10
# More classes than this fraction of the training rows (with at least this many rows) smells like an id column.
ID_LIKE_CLASSES, ID_LIKE_MIN_ROWS = 0.5, 20
TABLE_LABELS = 30  # label rows shown in the table; the rest are counted on one line
SNIPPET = 40  # characters of a text quoted in a warning


@dataclass
class SplitSummary:
    """One split as the run will use it."""

    source: str
    rows: int
    counts: dict[str, int] = field(default_factory=dict)  # label -> rows with it (classification)
    unlabelled: int = 0  # multi_label rows with an empty label set
    targets: dict[str, float] | None = None  # regression: mean, std, min, max in the targets' own units
    skipped: list[str] = field(default_factory=list)  # rows read but not used, and why
    in_train: int = 0  # rows identical to a training row (validation/test)
    tokens: dict[str, int] | None = None  # p50, p90, p99, max, truncated (text)


@dataclass
class DataReport:
    """What `finetune validate` prints: a summary table and one line per warning."""

    task: str
    problem: str
    labels: list[str] | None
    splits: dict[str, SplitSummary]
    max_length: int | None = None  # text: data.max_length
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        """A plain-text summary: rows per split, labels per split (or target statistics), token lengths."""
        names = list(self.splits)
        parts = [self._splits_table(names)]
        if not get(self.problem).has_labels:
            stats = [
                [key, *(_number(self.splits[key].targets[s]) for s in ("mean", "std", "min", "max"))] for key in names
            ]
            parts.append(format_grid(["target", "mean", "std", "min", "max"], stats))
        else:
            parts.append(self._labels_table(names))
        if any(self.splits[key].tokens for key in names):
            header = [f"tokens (max_length {self.max_length})", "p50", "p90", "p99", "max", "truncated"]
            rows = []
            for key in names:
                t, count = self.splits[key].tokens, self.splits[key].rows
                rows.append([
                    key, t["p50"], t["p90"], t["p99"], t["max"], f"{t['truncated']} ({_percent(t['truncated'], count)})"
                ])
            parts.append(format_grid(header, rows))
        return "\n\n".join(parts) + "\n"

    def _splits_table(self, names: list[str]) -> str:
        header = ["split", "rows", "skipped", "also in train", "source"]
        rows = [
            [key, s.rows, len(s.skipped), "-" if key == "train" else s.in_train, s.source]
            for key, s in self.splits.items()
        ]
        return format_grid(header, rows)

    def _labels_table(self, names: list[str]) -> str:
        labels = self.labels or []
        shown = labels if len(labels) <= TABLE_LABELS else labels[: TABLE_LABELS - 1]
        rows = [[label, *(self.splits[key].counts.get(label, 0) for key in names)] for label in shown]
        if len(shown) < len(labels):
            rest = labels[len(shown):]
            rows.append(
                [f"... {len(rest)} more", *(sum(self.splits[key].counts.get(x, 0) for x in rest) for key in names)]
            )
        if get(self.problem).empty_rows:
            rows.append(["(no label)", *(self.splits[key].unlabelled for key in names)])
        return format_grid([f"label ({len(labels)}, {self.problem})", *names], rows)


def check_data(recipe) -> DataReport:
    """Read the recipe's data exactly as `run` does, check the backbone name and output.dir, and report.

    Bad input raises FinetuneError (one line naming the file, column or row); what is legal but suspicious becomes a
    warning. Nothing here builds a model: text loads only the backbone's config and tokenizer.
    """
    from finetune.backbones import check_backbone_layers
    from finetune.tasks import get_task

    task = get_task(recipe.task)
    report = task.check_data(recipe)
    check_backbone_layers(recipe, task.library)  # backbone.layers within the backbone's depth
    if recipe.distill is not None:  # the teacher's task, problem and labels against the data's: one line each
        from finetune.distill import check_teacher

        check_teacher(recipe, task.load_splits(recipe).label_names)
    report.warnings.extend(check_output(recipe))
    return report


def backbone_max_tokens(tokenizer, config) -> int | None:
    """The longest sequence the backbone takes: the tokenizer's own limit, else the config's position count."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:  # transformers' "no limit" is a huge sentinel
        return limit
    positions = getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def check_vision_backbone(recipe) -> None:
    """A timm name or local-dir folder that cannot exist fails here; loading weights is left to `run`."""
    from finetune.backbones import VISION_ZOO, timm_source

    if recipe.backbone.name not in VISION_ZOO:
        timm_source(recipe.backbone.name)


# what build_transforms needs from a backbone's data config; only the augmentation keys are checked with it
_STAND_IN_DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                         "crop_pct": 1.0, "crop_mode": "center"}


def check_augmentation(recipe, splits: Splits) -> None:
    """The augment section as `run` will build it (a timm policy string, mixup's needs), with no model."""
    from finetune.tasks.image_classification.transforms import build_mixup, build_transforms

    build_transforms(_STAND_IN_DATA_CONFIG, recipe, training=True)
    build_mixup(recipe, len(splits.label_names or []) or 2)


def check_output(recipe) -> list[str]:
    """output.dir must be a folder we can create or write; an existing run there is a warning (run needs
    --overwrite)."""
    out = Path(recipe.output.dir).expanduser()
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"output.dir: '{out}' is a file; choose a folder path")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FinetuneError(f"output.dir: '{out}' cannot be created: '{existing}' is a file; choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FinetuneError(f"output.dir: '{existing}' is not writable; choose a folder you can write to")
    if out.is_dir() and any(out.iterdir()):
        return [f"output.dir: '{out}' already holds a run; `finetune run` replaces it only with --overwrite"]
    return []


def data_report(recipe, splits: Splits, tokenizer=None, max_positions: int | None = None,
                images: bool = False) -> DataReport:
    """The report on splits already loaded (what `run` can print without reading the data twice).

    tokenizer: text token-length percentiles against data.max_length; max_positions: the backbone's limit, an error
    when data.max_length exceeds it and some text is longer (the run would fail inside the model); images: the
    inputs are images (the image task's report: fingerprints of pixels, skipped files), else texts.
    """
    text = not images
    problem, names = splits.problem, splits.label_names
    summaries = {key: _summarise(key, splits) for key in SPLITS if key in splits.parts}
    report = DataReport(recipe.task, problem, names, summaries, recipe.data.max_length if text else None)

    def say(warning: str) -> None:  # one line each, whatever a label or file name holds
        report.warnings.append(" ".join(warning.split()))

    fingerprint = _text_key if text else _image_key
    keys = {key: [fingerprint(entry) for entry in _row_inputs(part)] for key, part in splits.parts.items()}

    for warning in splits.warnings:  # the splitting's own (a class short of data.train_per_class)
        say(warning)
    for key, summary in summaries.items():
        if summary.skipped:
            what = "empty or blank text(s) dropped" if text else "unreadable image(s) skipped (data.skip_bad_images)"
            say(f"data.{key}: {len(summary.skipped)} {what}, first {summary.skipped[0]}; split.json lists them")
    if not get(problem).has_labels:
        train = summaries["train"].targets
        if train["std"] == 0:
            say(f"data.train: every regression target is {_number(train['min'])}; there is nothing to learn")
    else:
        _class_warnings(report, len(splits.parts["train"].texts), say)
        _conflicts(splits.parts["train"], keys["train"], problem, say)
    for key in ("validation", "test"):
        if key in keys:
            summaries[key].in_train = count_leakage(splits.parts, keys, key, text, say)
    if text and tokenizer is not None:
        for key, part in splits.parts.items():
            summaries[key].tokens = _token_lengths(part.texts, tokenizer, recipe.data.max_length, part.pairs)
        _token_warnings(report, recipe, max_positions, say)
    return report


# ---------------------------------------------------------------------------------------------------------------
# Per-split summaries and warnings.


def _summarise(key: str, splits: Splits) -> SplitSummary:
    info = splits.info["splits"][key]
    table = getattr(splits, key)
    summary = SplitSummary(
        source=info["source"], rows=info["count"], skipped=info.get("skipped") or info.get("empty_texts") or []
    )
    for name, value in get(splits.problem).summary(table["label"], splits).items():
        setattr(summary, name, value)
    return summary


def _class_warnings(report: DataReport, train_rows: int, say) -> None:
    counts = report.splits["train"].counts
    present = {name: n for name, n in counts.items() if n}
    absent = [name for name, n in counts.items() if not n]
    if absent:  # a label seen in the file but not among the rows kept (max_samples, dropped rows)
        say(f"data.train: no training rows left for {_names(absent)} (after data.max_samples / dropped rows)")
    if len(present) >= 2:
        largest = max(present, key=present.get)
        smallest = min(present, key=present.get)
        ratio = present[largest] / present[smallest]
        if ratio > IMBALANCE_RATIO:
            say(
                f"data.train: classes are imbalanced ({ratio:.0f}x): '{largest}' has {present[largest]} rows, "
                f"'{smallest}' {present[smallest]}; judge the model by f1_macro rather than accuracy, or add rows of "
                "the small classes"
            )
    if train_rows >= ID_LIKE_MIN_ROWS and len(counts) > ID_LIKE_CLASSES * train_rows:
        say(f"data.train: {len(counts)} classes in {train_rows} rows; is data.label_column the label, not an id?")
    for key in ("validation", "test"):
        if key in report.splits:
            missing = [name for name, n in report.splits[key].counts.items() if not n]
            if missing:
                say(
                    f"data.{key}: no rows of {_names(missing)} ({len(missing)} of {len(counts)} classes); "
                    f"their scores cannot be measured on {key}"
                )


def _names(names: list[str], shown: int = 5) -> str:
    quoted = ", ".join(f"'{n}'" for n in names[:shown])
    return f"class {quoted}" if len(names) == 1 else f"classes {quoted}" + (", ..." if len(names) > shown else "")


def _label_of(part: RawSplit, position: int, problem: str):
    return get(problem).label_key(part.labels[position])


def _conflicts(part: RawSplit, keys: list, problem: str, say) -> None:
    """The same input with different labels in train: label noise the model cannot fit."""
    first: dict = {}
    conflicts = []
    for i, key in enumerate(keys):
        if key is None:
            continue
        j = first.setdefault(key, i)
        if j != i and _label_of(part, i, problem) != _label_of(part, j, problem):
            conflicts.append((j, i))
    if conflicts:
        j, i = conflicts[0]
        a, b = where_rows(part, [j, i])
        say(
            f"data.train: {len(conflicts)} row(s) repeat an input with a different label, e.g. {a} "
            f"({_label_of(part, j, problem)!r}) and {b} ({_label_of(part, i, problem)!r}); fix or drop them"
        )


def count_leakage(parts: dict[str, RawSplit], keys: dict[str, list], key: str, text: bool, say) -> int:
    """Rows of validation/test identical to a training row: they score what the model memorised."""
    train_at = {}
    for i, fingerprint in enumerate(keys["train"]):
        if fingerprint is not None:
            train_at.setdefault(fingerprint, i)
    shared = [i for i, fingerprint in enumerate(keys[key]) if fingerprint is not None and fingerprint in train_at]
    if shared:
        i = shared[0]
        here, there = _name_row(parts[key], i, text), _name_row(parts["train"], train_at[keys[key][i]], text)
        what = f" ({_snippet(parts[key].texts[i])})" if text else ""
        rows = len(keys[key])
        say(
            f"leakage: {len(shared)} of {rows} data.{key} rows ({_percent(len(shared), rows)}) are identical to "
            f"training rows, e.g. {here} = {there}{what}; deduplicate before splitting"
        )
    return len(shared)


def _name_row(part: RawSplit, position: int, text: bool) -> str:
    """An image file by its path (a folder's row is only its path inside the folder); anything else by its row."""
    entry = part.texts[position]
    if not text and isinstance(entry, str) and not isinstance(part.rows[position], int):
        return f"'{entry}'"
    return where_rows(part, [position])[0]


def _row_inputs(part: RawSplit) -> list:
    """What a row's model input is: its text, or its (text, text_pair)."""
    return part.texts if part.pairs is None else list(zip(part.texts, part.pairs))


def _text_key(text: Any):
    """Texts that differ only in whitespace count as the same text (a pair: both texts)."""
    if isinstance(text, tuple):
        keys = tuple(_text_key(t) for t in text)
        return None if None in keys else keys
    return " ".join(text.split()) if isinstance(text, str) else None


def _image_key(entry: Any):
    """The bytes of an image (file, bytes or array): exact duplicates, even under different names."""
    if isinstance(entry, dict):
        entry = entry.get("bytes") or entry.get("path")
    try:
        if isinstance(entry, (bytes, bytearray, memoryview)):
            data = bytes(entry)
        elif isinstance(entry, (str, os.PathLike)):
            data = Path(entry).read_bytes()
        elif isinstance(entry, np.ndarray):
            data = str(entry.shape).encode() + entry.tobytes()
        elif hasattr(entry, "tobytes"):  # a PIL image
            data = str((entry.mode, entry.size)).encode() + entry.tobytes()
        else:
            return None
    except OSError:
        return None
    return hashlib.sha1(data).digest()


def _snippet(text) -> str:
    text = " ".join(text) if isinstance(text, (list, tuple)) else text  # a sentence of words
    text = " ".join(text.split())
    return repr(text if len(text) <= SNIPPET else text[: SNIPPET - 3] + "...")


# ---------------------------------------------------------------------------------------------------------------
# Token lengths.


def _token_lengths(texts: list[str], tokenizer, max_length: int, pairs: list[str] | None = None) -> dict[str, int]:
    """Percentiles of the token count with special tokens (what data.max_length truncates), and how many exceed it;
    a pair counts both texts, as the model sees them."""
    lengths = []
    for start in range(0, len(texts), 1000):
        batch = tokenizer(
            texts[start:start + 1000], None if pairs is None else pairs[start:start + 1000],
            add_special_tokens=True, truncation=False, verbose=False,
            return_attention_mask=False, return_token_type_ids=False,
        )
        lengths.extend(len(ids) for ids in batch["input_ids"])
    values = np.asarray(lengths)
    p50, p90, p99 = (int(v) for v in np.percentile(values, [50, 90, 99], method="higher"))
    return {"p50": p50, "p90": p90, "p99": p99, "max": int(values.max()), "truncated": int((values > max_length).sum())}


def _token_warnings(report: DataReport, recipe, max_positions: int | None, say) -> None:
    max_length = recipe.data.max_length
    longest = max(s.tokens["max"] for s in report.splits.values())
    if max_positions is not None and max_length > max_positions and longest > max_positions:
        raise FinetuneError(
            f"data.max_length: {max_length} tokens is more than backbone '{recipe.backbone.name}' takes "
            f"({max_positions}), and the longest text has {longest}; set data.max_length={max_positions} or less"
        )
    over = {
        key: s.tokens["truncated"]
        for key, s in report.splits.items()
        if s.tokens["truncated"] > TRUNCATION_WARNING * s.rows
    }
    if over:
        shares = ", ".join(f"{_percent(n, report.splits[key].rows)} of {key} ({n})" for key, n in over.items())
        first = report.splits[next(iter(over))].tokens
        room = f" ({recipe.backbone.name} takes up to {max_positions})" if max_positions else ""
        # a short max_length can be the recipe's choice (the quickstart's 64: a headline carries the topic), so the
        # line says when truncation is fine instead of only counting it
        say(
            f"data.max_length: {shares} texts are longer than {max_length} tokens and will be truncated "
            f"({next(iter(over))}: p50 {first['p50']}, p90 {first['p90']}, max {first['max']} tokens): the model reads "
            f"each text's first {max_length} tokens, enough when a text's start carries its label (a headline, a "
            f"subject line); otherwise raise data.max_length{room}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Formatting.


def _percent(part: int, whole: int) -> str:
    share = 100 * part / whole if whole else 0.0
    return "<1%" if 0 < share < 1 else f"{share:.0f}%"


def _number(value: float) -> str:
    return f"{value:.4g}"


def format_grid(header: list, rows: list[list]) -> str:
    """Columns padded to their widest cell: the first and last text columns left-aligned, numbers right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        out = []
        for i, cell in enumerate(row):
            left = i == 0 or (i == len(row) - 1 and header[i] == "source")
            out.append(cell.ljust(widths[i]) if left else cell.rjust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join(line(row) for row in cells)
