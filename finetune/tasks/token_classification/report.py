"""The data report for tagged sentences: scheme checks, entities per type, sentences longer than max_length."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from finetune.checks import format_grid
from finetune.data import RawSplit
from finetune.tasks.token_classification.alignment import require_fast
from finetune.tasks.token_classification.conll import where_word
from finetune.tasks.token_classification.tags import OUTSIDE, PREFIXED, entity_spans, entity_type, tag_scheme

# Warn when more than this share of a split's sentences is cut at data.max_length (as the text report does).
TRUNCATION_WARNING = 0.10


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
        names = list(self.entities)
        types = sorted({kind for counts in self.entities.values() for kind in counts})
        rows = [[kind, *(self.entities[key].get(kind, 0) for key in names)] for kind in types]
        rows.append(["(all)", *(sum(self.entities[key].values()) for key in names)])
        parts = [format_grid([f"entities ({self.scheme})", *names], rows)]
        if self.tokens:
            header = [f"sub-tokens (max_length {self.max_length})", "p50", "p90", "p99", "max", "truncated",
                      "words cut", "entities cut"]
            rows = [[key, t["p50"], t["p90"], t["p99"], t["max"], t["truncated"], t["words_cut"], t["entities_cut"]]
                    for key, t in self.tokens.items()]
            parts.append(format_grid(header, rows))
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
    opener = "B-" + entity_type(tag)
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
    require_fast(tokenizer)
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


@dataclass
class TokenDataReport:
    """`validate`'s report for tagged sentences: sentences per split, the tag report's tables and warnings."""

    splits: dict  # split name -> checks.SplitSummary (rows, source, skipped)
    tags: TagReport
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [[key, s.source, s.rows, len(s.skipped), s.in_train] for key, s in self.splits.items()]
        header = ["split", "source", "sentences", "skipped", "same as train"]
        return format_grid(header, rows) + "\n\n" + self.tags.table()
