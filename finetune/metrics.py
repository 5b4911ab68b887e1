"""Evaluation metrics that work offline (scikit-learn and SciPy, imported at the first score), by problem type,
with their direction; and Hugging Face `evaluate` modules a recipe names as `evaluate:<folder or hub id>[#key]`
(their code runs only when the recipe sets `eval.trust_metric_code: true`)."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np

# name -> (problems it applies to, higher is better, fn(y_true, y_pred) -> float)
# Classification metrics get label indices (single_label) or 0/1 indicator matrices (multi_label).
_CLASSIFICATION = ("single_label", "multi_label")


def _sk(name: str, **options) -> Callable:
    """sklearn.metrics.<name>, imported at the first score: scikit-learn and SciPy cost seconds of every start-up."""

    def compute(y, p):
        from sklearn import metrics

        return getattr(metrics, name)(y, p, **options)

    return compute


def _f1(average: str) -> Callable:
    return _sk("f1_score", average=average, zero_division=0)


def _precision(average: str) -> Callable:
    return _sk("precision_score", average=average, zero_division=0)


def _recall(average: str) -> Callable:
    return _sk("recall_score", average=average, zero_division=0)


def _correlation(name: str) -> Callable:
    def compute(y, p):
        if len(y) < 2 or np.std(y) == 0 or np.std(p) == 0:
            return 0.0  # undefined for constant inputs; 0 says "no linear/rank relation seen"
        from scipy import stats

        return getattr(stats, name)(y, p)[0]

    return compute


METRICS: dict[str, tuple[tuple[str, ...], bool, Callable]] = {
    # accuracy is exact-match (subset) accuracy for multi_label
    "accuracy": (_CLASSIFICATION, True, _sk("accuracy_score")),
    "f1_macro": (_CLASSIFICATION, True, _f1("macro")),
    "f1_micro": (_CLASSIFICATION, True, _f1("micro")),
    "f1_weighted": (_CLASSIFICATION, True, _f1("weighted")),
    "precision_macro": (_CLASSIFICATION, True, _precision("macro")),
    "precision_micro": (_CLASSIFICATION, True, _precision("micro")),
    "precision_weighted": (_CLASSIFICATION, True, _precision("weighted")),
    "recall_macro": (_CLASSIFICATION, True, _recall("macro")),
    "recall_micro": (_CLASSIFICATION, True, _recall("micro")),
    "recall_weighted": (_CLASSIFICATION, True, _recall("weighted")),
    "matthews": (("single_label",), True, _sk("matthews_corrcoef")),
    "mse": (("regression",), False, _sk("mean_squared_error")),
    "rmse": (("regression",), False, lambda y, p: math.sqrt(_sk("mean_squared_error")(y, p))),
    "mae": (("regression",), False, _sk("mean_absolute_error")),
    "r2": (("regression",), True, _sk("r2_score")),
    "pearson": (("regression",), True, _correlation("pearsonr")),
    "spearman": (("regression",), True, _correlation("spearmanr")),
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
    if name == "loss":
        return False
    if is_evaluate(name):
        return _DECLARED.get(name, {}).get("higher", True)
    return METRICS[name][1]


def is_improvement(name: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if higher_is_better(name) else value < best


def compute_metrics(names: list[str], y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {name: evaluate_value(name, y_true, y_pred) if is_evaluate(name) else float(METRICS[name][2](y_true, y_pred))
            for name in names}


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face evaluate modules: `evaluate:<ref>` or `evaluate:<ref>#<key>` (a key of what compute() returns; nested
# keys joined by "/"). An entry without a key needs a module that returns one number. The value is stored under the
# entry as written, so eval.select_best, early stopping and a sweep name it the same way.

EVALUATE = "evaluate:"
# entry -> {"args": compute() keyword arguments, "config": config_name, "higher": direction}, from the recipe's eval
_DECLARED: dict[str, dict] = {}


def is_evaluate(name: str) -> bool:
    return isinstance(name, str) and name.startswith(EVALUATE)


def evaluate_parts(name: str) -> tuple[str, str | None]:
    """('accuracy', None) for 'evaluate:accuracy'; ('./seqeval', 'overall_f1') for 'evaluate:./seqeval#overall_f1'."""
    ref, _, key = name[len(EVALUATE):].partition("#")
    return ref.strip(), (key.strip() or None) if "#" in name else None


def declare(name: str, args: dict | None = None, higher: bool = True) -> None:
    """What the recipe says of an evaluate entry: compute()'s arguments (`config_name` goes to evaluate.load) and
    whether a larger value wins."""
    args = dict(args or {})
    _DECLARED[name] = {"config": args.pop("config_name", None), "args": args, "higher": higher}


@functools.lru_cache(maxsize=None)
def load_module(ref: str, config: str | None = None):
    """evaluate.load of a local folder or .py file (works offline) or a hub id (needs the hub or its cache)."""
    from finetune.errors import FinetuneError

    try:
        import evaluate
    except ImportError:
        raise FinetuneError(f"eval.metrics: 'evaluate:{ref}' needs the evaluate package; "
                            "pip install 'finetune[evaluate]'") from None
    try:
        # in memory: no cache files, so processes of one run (or two runs) never share a lock file
        return evaluate.load(ref, config_name=config, keep_in_memory=True)
    except Exception as error:  # evaluate raises FileNotFoundError, ConnectionError, ImportError, ... by cause
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FinetuneError(f"eval.metrics: evaluate could not load 'evaluate:{ref}' ({reason}); name a local folder "
                            f"holding its script (works offline), or a hub id where the hub or its cache is "
                            f"reachable") from None


def _numbers(output: Any, prefix: str = "") -> dict[str, float]:
    """The numbers in what compute() returned, nested keys joined by '/' (lists and strings left out)."""
    found: dict[str, float] = {}
    for key, value in (output or {}).items():
        if isinstance(value, dict):
            found.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            found[f"{prefix}{key}"] = float(value)
        elif isinstance(value, np.ndarray) and value.size == 1:
            found[f"{prefix}{key}"] = float(value.reshape(-1)[0])
    return found


def _plain(values) -> list:
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def evaluate_value(name: str, y_true, y_pred) -> float:
    """The entry's number for these references and predictions (as the built-in metrics of the problem take them)."""
    from finetune.errors import FinetuneError

    ref, key = evaluate_parts(name)
    declared = _DECLARED.get(name, {})
    module = load_module(ref, declared.get("config"))
    try:
        output = module.compute(predictions=_plain(y_pred), references=_plain(y_true), **declared.get("args", {}))
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FinetuneError(f"eval.metrics: '{name}' failed in compute() ({reason}); check the module's expected "
                            "inputs and eval.metric_args") from None
    numbers = _numbers(output)
    if key is None:
        if len(numbers) != 1:
            what = ", ".join(numbers) or "no number"
            raise FinetuneError(f"eval.metrics: '{name}' returned {what}; name one as '{name}#<key>'")
        return next(iter(numbers.values()))
    if key not in numbers:
        returned = ", ".join(numbers) or "no number"
        raise FinetuneError(f"eval.metrics: '{name}' returned no '{key}'; it returned {returned}")
    return numbers[key]
