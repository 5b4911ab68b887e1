"""Evaluation metrics that work offline (scikit-learn and SciPy), by problem type, with their direction."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import stats
from sklearn import metrics as skm

# name -> (problems it applies to, higher is better, fn(y_true, y_pred) -> float)
# Classification metrics get label indices (single_label) or 0/1 indicator matrices (multi_label).
_CLASSIFICATION = ("single_label", "multi_label")


def _f1(average: str) -> Callable:
    return lambda y, p: skm.f1_score(y, p, average=average, zero_division=0)


def _precision(average: str) -> Callable:
    return lambda y, p: skm.precision_score(y, p, average=average, zero_division=0)


def _recall(average: str) -> Callable:
    return lambda y, p: skm.recall_score(y, p, average=average, zero_division=0)


def _correlation(fn: Callable) -> Callable:
    def compute(y, p):
        if len(y) < 2 or np.std(y) == 0 or np.std(p) == 0:
            return 0.0  # undefined for constant inputs; 0 says "no linear/rank relation seen"
        return fn(y, p)[0]

    return compute


METRICS: dict[str, tuple[tuple[str, ...], bool, Callable]] = {
    # accuracy is exact-match (subset) accuracy for multi_label
    "accuracy": (_CLASSIFICATION, True, skm.accuracy_score),
    "f1_macro": (_CLASSIFICATION, True, _f1("macro")),
    "f1_micro": (_CLASSIFICATION, True, _f1("micro")),
    "f1_weighted": (_CLASSIFICATION, True, _f1("weighted")),
    "precision_macro": (_CLASSIFICATION, True, _precision("macro")),
    "precision_micro": (_CLASSIFICATION, True, _precision("micro")),
    "precision_weighted": (_CLASSIFICATION, True, _precision("weighted")),
    "recall_macro": (_CLASSIFICATION, True, _recall("macro")),
    "recall_micro": (_CLASSIFICATION, True, _recall("micro")),
    "recall_weighted": (_CLASSIFICATION, True, _recall("weighted")),
    "matthews": (("single_label",), True, skm.matthews_corrcoef),
    "mse": (("regression",), False, skm.mean_squared_error),
    "rmse": (("regression",), False, lambda y, p: math.sqrt(skm.mean_squared_error(y, p))),
    "mae": (("regression",), False, skm.mean_absolute_error),
    "r2": (("regression",), True, skm.r2_score),
    "pearson": (("regression",), True, _correlation(stats.pearsonr)),
    "spearman": (("regression",), True, _correlation(stats.spearmanr)),
}


def _seqeval(name: str) -> Callable:
    """Entity-level micro scores over rows of IOB2 tag names (conlleval's counting)."""

    def compute(y, p):
        from seqeval import metrics

        return getattr(metrics, f"{name}_score")(list(y), list(p), zero_division=0)

    return compute


def _token_accuracy(y, p) -> float:
    pairs = [(a, b) for true, predicted in zip(y, p) for a, b in zip(true, predicted)]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else 0.0


# token classification: rows of tag names per sentence (finetune.problems.Tags scores them with the tag scheme)
METRICS.update({
    "f1": (("tags",), True, _seqeval("f1")),
    "precision": (("tags",), True, _seqeval("precision")),
    "recall": (("tags",), True, _seqeval("recall")),
    "token_accuracy": (("tags",), True, _token_accuracy),
})


def metrics_for(problem: str) -> list[str]:
    return [name for name, (problems, _, _) in METRICS.items() if problem in problems]


def higher_is_better(name: str) -> bool:
    return False if name == "loss" else METRICS[name][1]


def is_improvement(name: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if higher_is_better(name) else value < best


def predictions_from_logits(logits: np.ndarray, problem: str, threshold: float = 0.5) -> np.ndarray:
    """What a model predicts: a class index, a 0/1 row per label set, the regression value, a tag per token."""
    from finetune.problems import get

    return get(problem).predict(logits, threshold)


def compute_metrics(names: list[str], y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {name: float(METRICS[name][2](y_true, y_pred)) for name in names}
