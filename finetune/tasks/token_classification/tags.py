"""Tag schemes, entity spans and the tag metrics (a leaf: `finetune.problems` scores tags with it, so it imports
nothing of the kit that could import problems back)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from finetune.errors import FinetuneError

IGNORE_INDEX = -100  # what torch's cross_entropy skips: special tokens, continuation sub-tokens, padding
OUTSIDE = "O"
SCHEMES = ("IOB2", "BIOES", "BILOU", "plain")
MODES = ("default", "strict")
PREFIXED = re.compile(r"^([BIESLU])-(.+)$")


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


def entity_type(name: str) -> str:
    match = PREFIXED.match(name)
    return match.group(2) if match else name


def entity_types(names: Sequence[str]) -> list[str]:
    """The entity types a tag set names (PER from B-PER and I-PER), sorted; `O` is none."""
    return sorted({entity_type(name) for name in names if name != OUTSIDE})


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
