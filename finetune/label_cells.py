"""Label cells as users write them: a class name, a label set, a missing cell, what kind of value a cell holds."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from finetune.errors import FinetuneError

Where = Callable[[int], str]  # a row's position -> where its user finds it ("train.csv line 12")


def class_name(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # pandas turns an int column with a gap into floats
    return str(value).strip()


def label_set(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, (list, tuple)):
        return [class_name(v) for v in value if v is not None and class_name(v)]
    return [part.strip() for part in str(value).split("|") if part.strip()]


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def value_kind(value: Any) -> str:
    """What a cell holds, in words: a number (numeric strings too, as a csv gives them), text, true/false, a list..."""
    if isinstance(value, (bool, np.bool_)):
        return "true/false"
    if isinstance(value, (int, float, np.number)):
        return "a number"
    if isinstance(value, str):
        try:
            float(value)
            return "a number"
        except ValueError:
            return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    return "a mapping" if isinstance(value, dict) else type(value).__name__


def sort_key(name: str):
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def entropy(counts: Sequence[int]) -> float:
    """The entropy (nats) of the frequencies `counts` make: the loss of predicting them for every row."""
    shares = np.asarray(counts, dtype=np.float64) / max(sum(counts), 1)
    return float(-(shares[shares > 0] * np.log(shares[shares > 0])).sum())


def present_kinds(values: list, where: Where, key: str, what: str, blank_is_missing: bool) -> dict[str, list[int]]:
    """Positions per kind of cell (value_kind); a missing cell (or a blank one, where that means missing) is refused."""
    kinds: dict[str, list[int]] = {}
    for i, label in enumerate(values):
        if is_missing(label) or (blank_is_missing and not class_name(label)):
            raise FinetuneError(f"{where(i)}: missing {what}; every row of {key} needs one")
        kinds.setdefault(value_kind(label), []).append(i)
    return kinds


def one_spelling(values: list, kinds: dict[str, list[int]], where: Where, key: str) -> None:
    """One class per row, all spelt the same way (a list or a mapping is several labels; mixed kinds a mistake)."""
    for kind in ("a list", "a mapping"):
        if kind in kinds:
            raise FinetuneError(
                f"{where(kinds[kind][0])}: the label is {kind}; several labels per row need head.problem=multi_label"
            )
    if len(kinds) > 1:  # e.g. 0/1 labels with a stray "positive": one of the two spellings is a mistake
        major, *others = sorted(kinds, key=lambda kind: len(kinds[kind]), reverse=True)
        odd = kinds[others[0]][0]
        example = values[kinds[major][0]]
        raise FinetuneError(
            f"{where(odd)}: label {values[odd]!r} is {others[0]}, but most labels of {key} are "
            f"{major} (such as {example!r}); mixed label types: spell every class the same way"
        )
