"""Token classification (NER, POS, chunking): tagged sentences read and checked, sub-token alignment, metrics, entities.

A split is a `finetune.data.RawSplit` whose `texts` are the sentences' word lists and whose `labels` are their tag
lists, so `data._subset`, `data._cap` and `data.where_rows` work on it unchanged. A CoNLL file's rows are the line
numbers its sentences start on (`row_name` "line", `row_offset` 0, no `path`); a table's rows are its row indices, as
`finetune.data` reads any table.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data import (
    FILE_BUILDERS,
    RawSplit,
    Splits,
    _label_values,
    _load_dataset,
    _subset,
    _where,
    check_utf8,
    load_table,
    require_columns,
    value_kind,
)
from finetune.errors import FinetuneError

CONLL_SUFFIXES = (".conll", ".txt", ".iob")
DOCSTART = "-DOCSTART-"
IGNORE_INDEX = -100  # what torch's cross_entropy skips: special tokens, continuation sub-tokens, padding
OUTSIDE = "O"
SCHEMES = ("IOB2", "BIOES", "BILOU", "plain")
MODES = ("default", "strict")
AGGREGATIONS = ("first", "simple")
PREFIXED = re.compile(r"^([BIESLU])-(.+)$")
# Warn when more than this share of a split's sentences is cut at data.max_length (as the text report does).
TRUNCATION_WARNING = 0.10
SHOWN_TAGS = 20  # tags listed in a message; the rest as "..."
SNIPPET = 40


# ---------------------------------------------------------------------------------------------------------------
# Reading: CoNLL files and tables of word/tag lists.


def read_split(spec: str, recipe, key: str) -> dict[str, RawSplit]:
    """The split(s) a data.train/validation/test value names (a CoNLL file, a table or hub:<id>), keyed by split name.

    Same contract as `finetune.data.read_split` (a file gives {"file": split}), so `assemble_splits` can take it;
    columns come from `recipe.data.tokens_column` and `recipe.data.tags_column`.
    """
    d = recipe.data
    if spec.startswith("hub:"):
        tables = _load_dataset(spec[len("hub:"):], what=f"{key}: '{spec}'")
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
                    f"{what} line {number}: {_snippet(fields[0])} has no tag column; write each word and its tag on "
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
    tag_cells = _label_values(table, tags_column, "tags")
    for i, (word_cell, tag_cell) in enumerate(zip(table[tokens_column], tag_cells)):
        words = _cell_list(word_cell, split, i, tokens_column, "words")
        tags = _cell_list(tag_cell, split, i, tags_column, "tags")
        if len(words) != len(tags):
            more = "more" if len(tags) > len(words) else "fewer"
            raise FinetuneError(
                f"{_where(split, i)}: {len(tags)} tags for {len(words)} words ({more} tags than words in column "
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
                    f"{_where(split, position)}: column '{column}' holds {_snippet(text)}, which is not a readable "
                    f"list; write the {what} as a JSON list such as {example}"
                ) from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        kind = "nothing" if value is None or (isinstance(value, float) and math.isnan(value)) else value_kind(value)
        shown = "" if kind == "nothing" else f" ({_snippet(value)})"
        raise FinetuneError(
            f"{_where(split, position)}: column '{column}' holds {kind}{shown}, not a list of {what}; write the {what} "
            f"as a list such as {example}"
        )
    items = []
    for j, item in enumerate(value):
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (str, int, float, np.number)):
            raise FinetuneError(
                f"{_where(split, position)}: item {j + 1} of column '{column}' is {value_kind(item)}, not text; "
                f"the {what} must be strings, as in {example}"
            )
        if isinstance(item, float) and item.is_integer():
            item = int(item)  # pandas turns ints with a gap into floats
        text = str(item).strip()
        if not text:
            raise FinetuneError(
                f"{_where(split, position)}: item {j + 1} of column '{column}' is empty; every one of the {what} "
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
    from finetune.data import SPLITS, _cap, read_parts, stratified_split

    d = recipe.data
    parts = read_parts(recipe, read_split)
    train = parts["train"]
    held_out_from_train = parts["validation"] is None
    if held_out_from_train:
        kept, held = stratified_split([0] * len(train.texts), d.val_fraction, recipe.train.seed)
        parts["train"], parts["validation"] = _subset(train, kept), _subset(train, held)
    names = tag_names(parts["train"])
    skipped: dict[str, list[str]] = {}
    for key in SPLITS:
        if parts[key] is not None:
            parts[key] = _cap(parts[key], d.max_samples, recipe.train.seed)
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
        "splits": {
            key: {"source": split.source, "count": len(split.rows), "rows": split.rows,
                  **({"skipped": skipped[key]} if skipped.get(key) else {})}
            for key, split in parts.items() if split is not None
        },
    }
    kept_parts = {key: split for key, split in parts.items() if split is not None}
    return Splits("tags", tables["train"], tables["validation"], tables["test"], names, info=info, parts=kept_parts)


def check_sentences(split: RawSplit, key: str) -> tuple[RawSplit, list[str]]:
    """Sentences with no words carry no signal and are dropped (split.json lists them); all empty is an error.

    The `check_inputs` of `finetune.data.assemble_splits`.
    """
    from finetune.data import where_rows

    empty = [i for i, words in enumerate(split.texts) if not words]
    if not empty:
        return split, []
    if len(empty) == len(split.texts):
        raise FinetuneError(f"{key}: every sentence of {split.source} is empty; check data.tokens_column")
    dropped = set(empty)
    kept = _subset(split, [i for i in range(len(split.texts)) if i not in dropped])
    return kept, [f"{where}: empty sentence" for where in where_rows(split, empty)]


def is_conll(split: RawSplit) -> bool:
    """True for a split read from a CoNLL file: its rows are line numbers."""
    return split.row_name == "line" and split.path is None and split.row_offset == 0


def where_word(split: RawSplit, sentence: int, word: int) -> str:
    """Where a word is, as its user finds it: its CoNLL line, or its table row and position."""
    if is_conll(split):
        return f"{split.source} line {split.rows[sentence] + word}"
    return f"{_where(split, sentence)} word {word + 1}"


def leakage_key(words: Sequence[str]) -> str:
    """What makes two sentences the same for the leakage check: their words, whatever the tags."""
    return " ".join(words)


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """IOB1 tags (B- only between two adjacent entities of one type) as IOB2 (B- opens every entity)."""
    out, previous = [], OUTSIDE
    for tag in tags:
        match = PREFIXED.match(tag)
        if match and match.group(1) == "I":
            before = PREFIXED.match(previous)
            if before is None or before.group(1) not in "BI" or before.group(2) != match.group(2):
                tag = "B-" + match.group(2)
        out.append(tag)
        previous = tag
    return out


# ---------------------------------------------------------------------------------------------------------------
# The tag set.


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
                    f"{key}: tag '{tag}' at {where_word(split, i, j)} (word {_snippet(split.texts[i][j])}) is not in "
                    f"the training tags ({shown}); add training sentences with it, or retag those words"
                )
        encoded.append([index[tag] for tag in tags])
    return encoded


def tag_scheme(names: Iterable[str]) -> str:
    """The tagging scheme the tag names follow: 'IOB2' (B-/I-), 'BIOES' (E-/S- too), 'BILOU' (L-/U-) or 'plain'.

    Plain tags (POS tags such as NN, VB) have no entity prefix: each word tagged other than 'O' counts as an entity
    of one word, so entity precision/recall/F1 become token-level scores over the tags other than 'O' (with no 'O'
    tag, all three equal token accuracy), and per-type details are per tag.
    """
    prefixes = {match.group(1) for name in names if (match := PREFIXED.match(name))}
    if not prefixes:
        return "plain"
    if prefixes & {"L", "U"}:
        return "BILOU"
    if prefixes & {"E", "S"}:
        return "BIOES"
    return "IOB2"


def _entity_type(name: str) -> str:
    match = PREFIXED.match(name)
    return match.group(2) if match else name


def _normalised(tags: Sequence[str], scheme: str) -> list[str]:
    """Tags as seqeval reads them: BILOU as BIOES (L->E, U->S), an unprefixed tag as a one-word entity."""
    single = "B-" if scheme in ("IOB2", "plain") else "S-"
    out = []
    for tag in tags:
        match = PREFIXED.match(tag) if scheme != "plain" else None
        if tag == OUTSIDE:
            out.append(tag)
        elif match is None:
            out.append(single + tag)
        elif scheme == "BILOU":
            out.append({"L": "E", "U": "S"}.get(match.group(1), match.group(1)) + "-" + match.group(2))
        else:
            out.append(tag)
    return out


def _seqeval_scheme(scheme: str):
    from seqeval.scheme import IOB2, IOBES

    return IOB2 if scheme in ("IOB2", "plain") else IOBES


def entity_spans(tags: Sequence[str], scheme: str, mode: str = "default") -> list[tuple[str, int, int]]:
    """(type, first word, end word exclusive) of each entity in one tag sequence, as the metrics count them.

    mode 'default' is seqeval's default, conlleval-compatible reading (an I-X after O opens an entity; what
    run_ner.py reports); 'strict' keeps only entities the scheme writes correctly (an I-X after O is no entity).
    """
    normalised = _normalised(tags, scheme)
    if mode == "strict" and scheme != "plain":
        from seqeval.scheme import Tokens

        return [(e.tag, e.start, e.end) for e in Tokens(normalised, _seqeval_scheme(scheme)).entities]
    from seqeval.metrics.sequence_labeling import get_entities

    return [(kind, start, end + 1) for kind, start, end in get_entities(normalised)]


# ---------------------------------------------------------------------------------------------------------------
# Data report pieces: scheme checks, entity counts, sentences longer than max_length.


@dataclass
class TagReport:
    """What the data report adds for tagged sentences: the scheme, entities per type per split, sub-token lengths."""

    scheme: str
    entities: dict[str, dict[str, int]]  # split -> entity type -> count
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> p50 p90 p99 max truncated ...
    warnings: list[str] = field(default_factory=list)
    max_length: int | None = None

    def table(self) -> str:
        """Entities per type per split, and sub-token lengths against max_length with what the cut loses."""
        from finetune.checks import _grid

        names = list(self.entities)
        types = sorted({kind for counts in self.entities.values() for kind in counts})
        rows = [[kind, *(self.entities[key].get(kind, 0) for key in names)] for kind in types]
        rows.append(["(all)", *(sum(self.entities[key].values()) for key in names)])
        parts = [_grid([f"entities ({self.scheme})", *names], rows)]
        if self.tokens:
            header = [f"sub-tokens (max_length {self.max_length})", "p50", "p90", "p99", "max", "truncated",
                      "words cut", "entities cut"]
            rows = [[key, t["p50"], t["p90"], t["p99"], t["max"], t["truncated"], t["words_cut"], t["entities_cut"]]
                    for key, t in self.tokens.items()]
            parts.append(_grid(header, rows))
        return "\n\n".join(parts) + "\n"


def tag_report(
    parts: dict[str, RawSplit], names: list[str], tokenizer=None, max_length: int | None = None
) -> TagReport:
    """The tag-scheme warnings, entity counts and (given a tokenizer) sub-token lengths of the splits.

    parts: split name -> RawSplit (train, validation, test). Warnings are one line each, naming a file and line.
    """
    scheme = tag_scheme(names)
    report = TagReport(scheme, {key: entity_counts(part, scheme) for key, part in parts.items()}, max_length=max_length)
    if scheme != "plain":
        unprefixed = [name for name in names if name != OUTSIDE and not PREFIXED.match(name)]
        if unprefixed:
            report.warnings.append(
                f"data.train: tag(s) {', '.join(repr(n) for n in unprefixed[:5])} have no B-/I- prefix while others "
                f"do ({scheme}); each word tagged so counts as an entity of its own"
            )
        for key, part in parts.items():
            report.warnings.extend(scheme_warnings(part, f"data.{key}", scheme))
    if tokenizer is not None and max_length is not None:
        for key, part in parts.items():
            report.tokens[key] = sentence_lengths(part, tokenizer, max_length, scheme)
            report.warnings.extend(_truncation_warnings(key, report.tokens[key], len(part.texts), max_length))
    return report


def scheme_warnings(split: RawSplit, key: str, scheme: str) -> list[str]:
    """A continuation tag (I-X, E-X, L-X) that does not follow B-X or I-X: one warning naming the first such line."""
    if scheme == "plain":
        return []
    bad: list[tuple[int, int, str]] = []  # (sentence, word, previous tag)
    for i, tags in enumerate(split.labels):
        previous = OUTSIDE
        for j, tag in enumerate(tags):
            match = PREFIXED.match(tag)
            if match and match.group(1) in "IEL":
                before = PREFIXED.match(previous)
                opened = before is not None and before.group(1) in "BI" and before.group(2) == match.group(2)
                if not opened:
                    bad.append((i, j, previous))
                    break  # one per sentence: the count is of sentences
            previous = tag
    if not bad:
        return []
    i, j, previous = bad[0]
    tag = split.labels[i][j]
    opener = "B-" + _entity_type(tag)
    return [(
        f"{key}: {len(bad)} sentence(s) continue an entity that was not opened, e.g. '{tag}' after '{previous}' at "
        f"{where_word(split, i, j)}; {scheme} opens each entity with {opener} (IOB1 files do not: convert them to "
        "IOB2); the default scoring reads such a tag as the start of an entity, metrics.mode strict drops it"
    )]


def entity_counts(split: RawSplit, scheme: str) -> dict[str, int]:
    """Entities per type in a split, read as the metrics read them (default mode)."""
    counts: Counter = Counter()
    for tags in split.labels:
        counts.update(kind for kind, _, _ in entity_spans(tags, scheme))
    return dict(sorted(counts.items()))


def sentence_lengths(split: RawSplit, tokenizer, max_length: int, scheme: str = "IOB2") -> dict[str, int]:
    """Sub-tokens per sentence with special tokens (what max_length cuts): p50/p90/p99/max, sentences truncated, and
    the words and entities past the cut, which get no label and no prediction."""
    _require_fast(tokenizer)
    lengths, truncated, words_cut, entities_cut = [], 0, 0, 0
    for start in range(0, len(split.texts), 1000):
        chunk = split.texts[start:start + 1000]
        full = tokenizer(chunk, is_split_into_words=True, truncation=False, verbose=False,
                         return_attention_mask=False, return_token_type_ids=False)
        long = [k for k, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
        lengths.extend(len(ids) for ids in full["input_ids"])
        if not long:
            continue
        # tokenised again with the run's truncation: which words keep a sub-token depends on the truncation side
        cut = tokenizer([chunk[k] for k in long], is_split_into_words=True, truncation=True, max_length=max_length)
        for n, k in enumerate(long):
            kept = {w for w in cut.word_ids(n) if w is not None}
            truncated += 1
            words_cut += len(chunk[k]) - len(kept)
            tags = split.labels[start + k]
            entities_cut += sum(
                1 for _, first, end in entity_spans(tags, scheme) if any(w not in kept for w in range(first, end))
            )
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "truncated": 0, "words_cut": 0, "entities_cut": 0}
    values = np.asarray(lengths)
    p50, p90, p99 = (int(v) for v in np.percentile(values, [50, 90, 99], method="higher"))
    return {"p50": p50, "p90": p90, "p99": p99, "max": int(values.max()), "truncated": truncated,
            "words_cut": words_cut, "entities_cut": entities_cut}


def _truncation_warnings(key: str, tokens: dict[str, int], sentences: int, max_length: int) -> list[str]:
    if not tokens["entities_cut"] and tokens["truncated"] <= TRUNCATION_WARNING * sentences:
        return []
    share = f"{100 * tokens['truncated'] / sentences:.0f}%" if sentences else "0%"
    return [(
        f"data.max_length: {tokens['truncated']} {key} sentence(s) ({share}) are longer than {max_length} sub-tokens "
        f"(max {tokens['max']}); their last {tokens['words_cut']} word(s) and {tokens['entities_cut']} entities are "
        "cut, unlabelled in training and unscored in evaluation; raise data.max_length to keep them"
    )]


# ---------------------------------------------------------------------------------------------------------------
# Alignment: word tags onto sub-tokens.


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise FinetuneError(
            f"token classification needs a fast tokenizer (tokenizer.json) to map sub-tokens to words; "
            f"{type(tokenizer).__name__} is not one"
        )


def continuation_tags(names: list[str]) -> list[int]:
    """For each tag id, the id its word's later sub-tokens take under label_all_tokens: B-X becomes I-X where the tag
    set has I-X (as run_ner.py's b_to_i_label); every other tag stays itself."""
    index = {name: i for i, name in enumerate(names)}
    return [index.get("I-" + name[2:], i) if name.startswith("B-") else i for i, name in enumerate(names)]


def align_labels(word_ids: Sequence[int | None], word_tags: Sequence[int], label_all_tokens: bool = False,
                 continuation: Sequence[int] | None = None) -> list[int]:
    """One sentence's word tag ids onto its sub-tokens: a word's tag on its first sub-token, -100 on special tokens
    and (unless label_all_tokens, then the continuation tag) on the word's other sub-tokens."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous:
            labels.append(word_tags[word])
        elif label_all_tokens:
            tag = word_tags[word]
            labels.append(continuation[tag] if continuation is not None else tag)
        else:
            labels.append(IGNORE_INDEX)
        previous = word
    return labels


def aligner(tokenizer, max_length: int, names: list[str], label_all_tokens: bool = False,
            words_key: str = "tokens", tags_key: str = "label") -> Callable[[dict], dict]:
    """A batched function for `datasets.Dataset.map`: words (`words_key`) and tag ids (`tags_key`) to input_ids,
    attention_mask (token_type_ids where the tokenizer makes them) and `labels`, truncated at max_length."""
    _require_fast(tokenizer)
    continuation = continuation_tags(names)

    def tokenize_and_align(batch: dict) -> dict:
        encoded = tokenizer(batch[words_key], is_split_into_words=True, truncation=True, max_length=max_length)
        encoded["labels"] = [
            align_labels(encoded.word_ids(i), tags, label_all_tokens, continuation)
            for i, tags in enumerate(batch[tags_key])
        ]
        return encoded

    return tokenize_and_align


def tokenize(table: dict, tokenizer, max_length: int, names: list[str], label_all_tokens: bool = False):
    """A `datasets.Dataset` of token ids and aligned labels from {"tokens": word lists, "label": tag id lists}
    (unpadded; cached by `datasets` under a fingerprint of the inputs, as `finetune.data.tokenize` is)."""
    import datasets
    from datasets.fingerprint import Hasher

    datasets.disable_progress_bars()
    from finetune.data import tokenizer_fingerprint

    fingerprint = Hasher.hash([table["tokens"], table["label"], tokenizer_fingerprint(tokenizer), max_length, names,
                               label_all_tokens])
    from finetune.caches import token_cache_dir

    cache_dir = token_cache_dir()  # beside the texts' (fingerprints differ): `finetune cache clear tokens` clears both
    cache_dir.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_dict({"tokens": table["tokens"], "label": table["label"]})
    return dataset.map(
        aligner(tokenizer, max_length, names, label_all_tokens),
        batched=True,
        remove_columns=["tokens", "label"],
        cache_file_name=str(cache_dir / f"{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
    )


def collator(tokenizer):
    """Pads a batch to its longest row: inputs with the tokenizer's pad id, labels with -100."""
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)


def make_loader(dataset, tokenizer, batch_size: int, shuffle: bool, seed: int, sampler=None):
    """`finetune.data.make_loader` with the token collator (padded labels)."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator, collate_fn=collator(tokenizer))


# ---------------------------------------------------------------------------------------------------------------
# Metrics.


def labelled_sequences(labels: Iterable[Sequence[int]], predictions: Iterable[Sequence[int]]
                       ) -> tuple[list[list[int]], list[list[int]]]:
    """Per sentence, the true and predicted tag ids at its labelled positions (label != -100): what the metrics take.

    labels/predictions: per-sentence rows of sub-token ids (a padded 2-D array or a list of rows); predictions are
    argmax ids. With first-sub-token labels each kept position is one word, in order; so align validation and test
    with label_all_tokens False even when training uses it, or the scores count sub-tokens (as run_ner.py's do).
    """
    true_rows, predicted_rows = [], []
    for label_row, predicted_row in zip(labels, predictions):
        label_row, predicted_row = np.asarray(label_row), np.asarray(predicted_row)
        keep = label_row != IGNORE_INDEX
        true_rows.append(label_row[keep].tolist())
        predicted_rows.append(predicted_row[keep].tolist())
    return true_rows, predicted_rows


def tag_rows(rows: Sequence[Sequence[int]], names: list[str]) -> list[list[str]]:
    """Tag id rows as tag names (what `eval --output` writes per sentence)."""
    return [[names[int(i)] for i in row] for row in rows]


def _check_options(mode: str, scheme: str | None) -> None:
    if mode not in MODES:
        raise FinetuneError(f"metrics mode '{mode}' is not one of {', '.join(MODES)}")
    if scheme is not None and scheme not in SCHEMES:
        raise FinetuneError(f"tag scheme '{scheme}' is not one of {', '.join(SCHEMES)}")


def tag_metrics(true_ids: Sequence[Sequence[int]], predicted_ids: Sequence[Sequence[int]], names: list[str],
                mode: str = "default", scheme: str | None = None) -> dict[str, float]:
    """Entity-level micro `precision`, `recall`, `f1` (seqeval) and `token_accuracy` over labelled words.

    true_ids/predicted_ids: per-sentence tag ids of the same words (see `labelled_sequences`). scheme: None reads it
    from the tag names (`tag_scheme`); mode: 'default' (conlleval-compatible) or 'strict' (see `entity_spans`).
    """
    from seqeval import metrics

    _check_options(mode, scheme)
    scheme = scheme or tag_scheme(names)
    y_true = [_normalised(row, scheme) for row in tag_rows(true_ids, names)]
    y_pred = [_normalised(row, scheme) for row in tag_rows(predicted_ids, names)]
    strict = mode == "strict" and scheme != "plain"
    options = {"mode": "strict", "scheme": _seqeval_scheme(scheme)} if strict else {}
    total = sum(len(row) for row in y_true)
    correct = sum(int(a == b) for t, p in zip(true_ids, predicted_ids) for a, b in zip(t, p))
    return {
        "precision": float(metrics.precision_score(y_true, y_pred, zero_division=0, **options)),
        "recall": float(metrics.recall_score(y_true, y_pred, zero_division=0, **options)),
        "f1": float(metrics.f1_score(y_true, y_pred, zero_division=0, **options)),
        "token_accuracy": correct / total if total else 0.0,
    }


def tag_details(true_ids: Sequence[Sequence[int]], predicted_ids: Sequence[Sequence[int]], names: list[str],
                mode: str = "default", scheme: str | None = None) -> dict:
    """Per entity type: precision, recall, F1 and support (true entities), in the columns style of the kit's details.

    {"per_entity": {"types": [...], "precision": [...], "recall": [...], "f1": [...], "support": [...]}}
    """
    _check_options(mode, scheme)
    scheme = scheme or tag_scheme(names)
    true_entities: set = set()
    predicted_entities: set = set()
    for n, (t, p) in enumerate(zip(tag_rows(true_ids, names), tag_rows(predicted_ids, names))):
        true_entities.update((n, *span) for span in entity_spans(t, scheme, mode))
        predicted_entities.update((n, *span) for span in entity_spans(p, scheme, mode))
    types = sorted({e[1] for e in true_entities | predicted_entities})
    columns: dict[str, list] = {"types": types, "precision": [], "recall": [], "f1": [], "support": []}
    for kind in types:
        actual = {e for e in true_entities if e[1] == kind}
        found = {e for e in predicted_entities if e[1] == kind}
        hits = len(actual & found)
        precision = hits / len(found) if found else 0.0
        recall = hits / len(actual) if actual else 0.0
        columns["precision"].append(precision)
        columns["recall"].append(recall)
        columns["f1"].append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        columns["support"].append(len(actual))
    return {"per_entity": columns}




# ---------------------------------------------------------------------------------------------------------------
# Decoding for predict/serve: logits to word tags and entities with character spans.


def split_words(text: str, tokenizer) -> list[tuple[int, int]]:
    """(start, end) of each word of a raw text as the tokenizer splits it: its pre-tokenizer (whitespace and
    punctuation for BERT) run on its normalised text, so a CJK character is a word where BERT's normaliser makes it
    one and characters it drops (a zero-width space) belong to no word; a marker a pre-tokenizer folds into a word
    (RoBERTa's space) is trimmed, so that every span is the word's own characters of `text`."""
    _require_fast(tokenizer)
    encoding = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False,
                         return_attention_mask=False, return_token_type_ids=False)
    spans = []
    for word in sorted({w for w in encoding.word_ids() if w is not None}):
        chars = encoding.word_to_chars(word)
        piece = text[chars.start:chars.end]
        start, end = chars.start + len(piece) - len(piece.lstrip()), chars.end - len(piece) + len(piece.rstrip())
        if end > start:
            spans.append((start, end))
    return spans


def join_words(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Pre-split words as one text, joined by single spaces (what spans index into), and each word's span."""
    spans, position = [], 0
    for word in words:
        spans.append((position, position + len(word)))
        position += len(word) + 1
    return " ".join(words), spans


@dataclass
class EncodedInputs:
    """Sentences ready for the model, with what decoding needs to map sub-tokens back to characters."""

    texts: list[str]  # a raw input itself; pre-split words joined by single spaces
    word_spans: list[list[tuple[int, int]]]  # each word's (start, end) in its text
    encoding: Any  # the tokenizer's BatchEncoding: padded tensors, offsets relative to each word, word_ids(i)

    def model_inputs(self) -> dict:
        """The tensors the model takes (the encoding without its offsets)."""
        return {key: value for key, value in self.encoding.items() if key != "offset_mapping"}

    @property
    def words(self) -> list[list[str]]:
        return [[text[s:e] for s, e in spans] for text, spans in zip(self.texts, self.word_spans)]


def encode_inputs(inputs: Sequence[str | Sequence[str]], tokenizer, max_length: int | None) -> EncodedInputs:
    """Raw texts (split as the pre-tokenizer splits them) or lists of words, tokenised as words, padded, truncated."""
    _require_fast(tokenizer)
    texts, spans, words = [], [], []
    for n, item in enumerate(inputs):
        if isinstance(item, str):
            item_spans = split_words(item, tokenizer)
            texts.append(item)
            words.append([item[s:e] for s, e in item_spans])
            spans.append(item_spans)
        elif isinstance(item, (list, tuple)) and all(isinstance(w, str) for w in item):
            text, item_spans = join_words(item)
            texts.append(text)
            words.append(list(item))
            spans.append(item_spans)
        else:
            raise FinetuneError(f"input {n + 1}: a token classifier takes a text or a list of words (strings), "
                                f"got {type(item).__name__}")
    # an input with no words still gets its special tokens, and so an empty prediction
    encoding = tokenizer(words, is_split_into_words=True, truncation=max_length is not None, max_length=max_length,
                         padding=True, return_offsets_mapping=True, return_tensors="pt")
    return EncodedInputs(texts, spans, encoding)


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def decode(logits: np.ndarray, encoded: EncodedInputs, names: list[str], aggregation: str = "first") -> list[dict]:
    """Per input {"words", "tags", "scores", "entities"} from per-sub-token logits [inputs, sub-tokens, tags].

    tags/scores: each word's tag and its probability, read on the word's first sub-token (as training labels it);
    None for a word past the max_length cut. entities: [{"word", "label", "start", "end", "score"}], "label" the type
    without B-/I-, start/end character offsets into the input (pre-split words: into the words joined by single
    spaces), "word" that slice of it, "score" the mean probability of the grouped parts. aggregation "first" groups
    the word tags (pipeline aggregation_strategy="first"); "simple" groups every sub-token's own argmax, as
    `pipeline("token-classification", aggregation_strategy="simple")` does, so a word can be split between entities.
    Grouping as the pipeline's: B-X opens an entity, I-X (or a plain tag X) continues one of type X; for BIOES and
    BILOU, S-/U- is a whole entity and E-/L- closes one.
    """
    if aggregation not in AGGREGATIONS:
        raise FinetuneError(f"aggregation '{aggregation}' is not one of {', '.join(AGGREGATIONS)}")
    probabilities = _softmax(logits)
    results = []
    for n, (text, spans) in enumerate(zip(encoded.texts, encoded.word_spans)):
        word_ids = encoded.encoding.word_ids(n)
        offsets = encoded.encoding["offset_mapping"][n].tolist()
        tags: list[str | None] = [None] * len(spans)
        scores: list[float | None] = [None] * len(spans)
        parts = []  # (tag id, score, start, end) of each word ("first") or sub-token ("simple")
        for position, word in enumerate(word_ids):
            if word is None:
                continue
            start = spans[word][0] + offsets[position][0]
            end = spans[word][0] + offsets[position][1]
            row = probabilities[n, position]
            best = int(row.argmax())
            if tags[word] is None:
                tags[word], scores[word] = names[best], float(row[best])
                if aggregation == "first":
                    parts.append([best, float(row[best]), start, end])
            if aggregation == "simple":
                parts.append([best, float(row[best]), start, end])
            if aggregation == "first":
                parts[-1][3] = end  # the word runs to its last kept sub-token
        entities = [
            {"word": text[start:end], "label": label, "start": start, "end": end, "score": score}
            for label, start, end, score in _group(parts, names)
        ]
        words = [text[s:e] for s, e in spans]
        results.append({"words": words, "tags": tags, "scores": scores, "entities": entities})
    return results


def _group(parts: list[list], names: list[str]) -> list[tuple[str, int, int, float]]:
    """(type, start, end, mean score) of adjacent parts that form one entity; 'O' parts are no entity."""
    groups: list[list] = []  # [type, parts, closed]
    for tag_id, score, start, end in parts:
        name = names[tag_id]
        match = PREFIXED.match(name)
        prefix, kind = (match.group(1), match.group(2)) if match else ("I", name)
        last = groups[-1] if groups else None
        continues = (last is not None and not last[2] and last[0] == kind and prefix in "IEL" and name != OUTSIDE)
        if continues:
            last[1].append((score, start, end))
        else:
            groups.append([kind, [(score, start, end)], False])
        if prefix in "SUEL":
            groups[-1][2] = True  # a single or closing tag ends its entity
    entities = []
    for kind, members, _ in groups:
        if kind == OUTSIDE:
            continue
        entities.append((kind, members[0][1], members[-1][2], float(np.mean([m[0] for m in members]))))
    return entities


def predict(model, tokenizer, inputs: Sequence[str | Sequence[str]], names: list[str], max_length: int | None,
            aggregation: str = "first", batch_size: int = 32, device: str | None = None, forward=None) -> list[dict]:
    """`decode` over a model's logits for raw texts or word lists, batched (what predict/serve print per input).
    forward: a function of the encoded batch giving numpy logits in place of `model` (an ONNX session's)."""
    if forward is None:
        forward = torch_forward(model, device)
    results = []
    for start in range(0, len(inputs), batch_size):
        encoded = encode_inputs(inputs[start:start + batch_size], tokenizer, max_length)
        results.extend(decode(forward(encoded.model_inputs()), encoded, names, aggregation))
    return results


def torch_forward(model, device=None):
    """The torch model as a function of a batch of tensors giving numpy logits [inputs, sub-tokens, tags]."""
    import torch

    device = device or next(model.parameters()).device

    def forward(batch: dict) -> np.ndarray:
        with torch.inference_mode():
            output = model(**{k: v.to(device) for k, v in batch.items()})
        logits = output.logits if hasattr(output, "logits") else output
        return logits.float().cpu().numpy()

    return forward


def _snippet(value: Any) -> str:
    text = " ".join(str(value).split())
    return repr(text if len(text) <= SNIPPET else text[: SNIPPET - 3] + "...")


# ---------------------------------------------------------------------------------------------------------------
# The task: what the training loop, validate, eval and predict ask of token classification.


@dataclass
class TokenDataReport:
    """`validate`'s report for tagged sentences: sentences per split, the tag report's tables and warnings."""

    splits: dict  # split name -> checks.SplitSummary (rows, source, skipped)
    tags: TagReport
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        from finetune.checks import _grid

        rows = [[key, s.source, s.rows, len(s.skipped), s.in_train] for key, s in self.splits.items()]
        header = ["split", "source", "sentences", "skipped", "same as train"]
        return _grid(header, rows) + "\n\n" + self.tags.table()


class TokenClassification:
    name = "token-classification"
    problems = ("tags",)
    inputs = "text"
    library = "transformers"
    column_key = "tokens_column"  # the data.* key naming the input column (predict --column's default)
    serve_input = "words"  # what one /predict input is (finetune.serve.INPUT_PARSERS)

    def check_recipe(self, recipe, need) -> None:
        h = recipe.head
        need(h.type == "linear" and h.pooling == "auto",
             "head.type: token-classification tags each token with a linear head (transformers' "
             "*ForTokenClassification); set head.type=linear and head.pooling=auto")
        need(recipe.data.text_pair_column is None, "data.text_pair_column: is for text-classification pairs")

    def read(self, spec: str, recipe, key: str) -> dict:
        return read_split(spec, recipe, key)

    def onnx_usage(self, info: dict) -> str:
        from finetune.tasks import onnx_text_usage

        decode = """
for words, encoding, row in zip(inputs, batch, logits):  # a word's tag is its first sub-token's
    first = {w: i for i, w in reversed(list(enumerate(encoding.word_ids))) if w is not None}
    print([(words[w], info["labels"][int(row[i].argmax())]) for w, i in sorted(first.items())])
"""
        return onnx_text_usage('[["John", "lives", "in", "Paris"], ["Mary", "sings"]]', ", is_pretokenized=True",
                               decode)

    def check_eval_inputs(self, raw, recipe):
        split, _ = check_sentences(raw, "--data")
        return split

    def load_splits(self, recipe):
        return load_splits(recipe)

    def _tokenizer(self, recipe):
        from finetune.backbones import load_text_config, load_tokenizer

        source, config = load_text_config(recipe)
        tokenizer = load_tokenizer(source, recipe.backbone.trust_remote_code)
        _require_fast(tokenizer)
        return source, config, tokenizer

    def report(self, recipe, splits, tokenizer) -> TokenDataReport:
        """Leakage of whole sentences, the tag scheme, entities per type, sentences cut at data.max_length."""
        from finetune import checks

        summaries = {}
        for key, part in splits.parts.items():
            info = splits.info["splits"][key]
            summaries[key] = checks.SplitSummary(source=info["source"], rows=info["count"],
                                                 skipped=info.get("skipped") or [])
        tags = tag_report(splits.parts, splits.label_names, tokenizer, recipe.data.max_length)
        report = TokenDataReport(summaries, tags)

        def say(warning: str) -> None:
            report.warnings.append(" ".join(warning.split()))

        for key, summary in summaries.items():
            if summary.skipped:
                say(f"data.{key}: {len(summary.skipped)} empty sentence(s) dropped, first {summary.skipped[0]}; "
                    "split.json lists them")
        keys = {key: [leakage_key(words) for words in part.texts] for key, part in splits.parts.items()}
        for key in ("validation", "test"):
            if key in keys:
                summaries[key].in_train = checks._leakage(splits.parts, keys, key, True, say)
        for warning in tags.warnings:
            say(warning)
        return report

    def check_data(self, recipe):
        splits = self.load_splits(recipe)
        _, _, tokenizer = self._tokenizer(recipe)
        return self.report(recipe, splits, tokenizer)

    def build_model(self, recipe, names: list[str], config, source: str, tokenizer):
        """transformers' `AutoModelForTokenClassification` with the tags as id2label (what exports natively)."""
        from transformers import AutoModelForTokenClassification

        from finetune.backbones import HEAD_DROPOUT_KEYS

        config.num_labels = len(names)
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
        for key in HEAD_DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, recipe.head.dropout)
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        trust = recipe.backbone.trust_remote_code
        try:
            if recipe.backbone.pretrained:
                return AutoModelForTokenClassification.from_pretrained(source, config=config, trust_remote_code=trust)
            return AutoModelForTokenClassification.from_config(config, trust_remote_code=trust)
        except (OSError, ValueError) as error:
            raise FinetuneError(
                f"backbone.name: cannot build a token-classification model from '{recipe.backbone.name}' ({error})"
            ) from None

    def job(self, recipe, accelerator):
        from finetune.tasks import Job
        from finetune.tasks.text_classification import longest_first, train_sampler

        t, d = recipe.train, recipe.data
        splits = self.load_splits(recipe)  # bad data fails here, before any run folder is made or removed
        source, config, tokenizer = self._tokenizer(recipe)
        report = self.report(recipe, splits, tokenizer)
        names = splits.label_names
        model = self.build_model(recipe, names, config, source, tokenizer)
        with accelerator.main_process_first():  # the main process tokenises and caches; the others read the cache
            datasets = {
                # evaluation scores each word once, on its first sub-token, whatever training labels
                key: tokenize(table, tokenizer, d.max_length, names, d.label_all_tokens and key == "train")
                for key, table in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
                if table is not None
            }

        def save(unwrapped, directory):
            directory.mkdir(parents=True, exist_ok=True)
            tokenizer.save_pretrained(directory)
            unwrapped.save_pretrained(directory)

        return Job(
            splits,
            model,
            datasets,
            make_loader=lambda dataset, batch, training: make_loader(
                dataset, tokenizer, batch, training, t.seed,
                train_sampler(recipe, dataset, batch) if training else longest_first(dataset),
            ),
            save=save,
            warnings=report.warnings,
        )

    def read_inputs(self, path: Path) -> list[tuple[str, list[str]]] | None:
        """predict's inputs from a CoNLL file: its sentences as word lists (the tags are not needed); None for
        other files (texts, tables)."""
        if path.suffix.lower() not in CONLL_SUFFIXES or path.suffix.lower() == ".txt":
            return None  # .txt: one raw text per line, as for every text model
        split = read_conll(path, f"'{path}'")
        return [(" ".join(words), words) for words in split.texts]

    def predict(self, predictor, inputs, top_k=None, batch_size: int = 32):
        """Entities (word, label, start, end, score) and each word's tag, for raw texts or lists of words."""
        for i, item in enumerate(inputs):
            words = isinstance(item, (list, tuple)) and all(isinstance(w, str) for w in item)
            if not (isinstance(item, str) or words):
                raise FinetuneError(f"input {i + 1}: a token-classification model takes a text or a list of words, "
                                    f"got {type(item).__name__}")
        # the predictor's own forward pass: the torch model, or an ONNX export's onnxruntime session
        return predict(None, predictor.preprocess, list(inputs), predictor.labels, predictor.max_length,
                       batch_size=batch_size, forward=predictor._forward)

    def evaluate(self, predictor, raw: RawSplit, recipe, batch_size: int = 32) -> dict:
        """`finetune eval`: the run's metrics on labelled sentences, each word scored on its first sub-token (as
        the run's own evaluation), and per sentence its words, true and predicted tags (`records`)."""
        import types

        import torch

        from finetune.problems import get

        names, tokenizer = predictor.labels, predictor.preprocess
        encoded = encode_tags(raw, names, "--data")
        dataset = tokenize({"tokens": raw.texts, "label": encoded}, tokenizer, predictor.max_length, names)
        batches = []
        for batch in make_loader(dataset, tokenizer, batch_size, False, 0):
            labels = batch.pop("labels")  # the predictor's forward: torch, or an ONNX export's session
            batches.append((torch.from_numpy(predictor._forward(dict(batch))), labels))
        details: dict = {}
        metrics = get("tags").score(batches, recipe.eval.metrics, types.SimpleNamespace(label_names=names),
                                    details=details)
        predicted: list[list[int]] = []
        for logits, labels in batches:
            predicted += labelled_sequences(labels.tolist(), logits.argmax(-1).tolist())[1]
        records = []
        for row, words, truth, guess in zip(raw.rows, raw.texts, encoded, predicted):
            # words past data.max_length were never seen: no predicted tag
            shown = [names[t] for t in guess] + [""] * (len(words) - len(guess))
            records.append({"row": row, "tokens": " ".join(words), "tags": " ".join(names[t] for t in truth),
                            "predicted": " ".join(shown).strip(), "correct": guess == truth})
        return {"metrics": metrics, "rows": len(raw.texts), "details": details, **details, "records": records}

    def card_usage(self, recipe, reference: str) -> str:
        # trained on first sub-tokens only, a word's later pieces carry no learnt tag: "first" reads the word's tag
        # where training put it ("simple" would split words into pieces of different entities)
        aggregation = "simple" if recipe.data.label_all_tokens else "first"
        return (
            "This folder is a standard transformers token-classification model; finetune is not needed:\n\n"
            "```python\nfrom transformers import pipeline\n\n"
            f'MODEL = "{reference}"\n'
            f'tag = pipeline("token-classification", model=MODEL, aggregation_strategy="{aggregation}")\n'
            'print(tag("your text here"))  # entities: entity_group, score, word, start, end\n```\n'
        )


TASK = TokenClassification()
