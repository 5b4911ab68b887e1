"""Whether a run learned anything: its evaluations held against a model that learned only the label frequencies."""

from __future__ import annotations

from finetune import problems

# A best validation loss within 2% of the baseline's learned nothing worth keeping: a balanced pair set's ln 2 =
# 0.693 against 0.679; a run that learns a little (accuracy 0.6 on pairs) reaches about 0.66.
TOLERANCE = 0.02


def of_run(history: list[dict], splits) -> dict:
    """metrics.json's `health`: whether the run learned, why not (reasons), and the numbers it was judged on."""
    problem = problems.get(splits.problem)
    baseline = problem.baseline_loss(splits.train["label"], len(splits.label_names or []))
    return assess(history, baseline, problem.answer, problem.baseline_guess)


def assess(history: list[dict], baseline: float | None, answer: str = "class",
           guess: str = "the training label frequencies") -> dict:
    """Learned nothing: every evaluation predicted one `answer` for every row (where the truth holds several), or
    the best validation loss (raw or EMA weights) stayed at `baseline`, the loss of predicting `guess` (training's
    label frequencies) for every row."""
    losses = [entry[key]["loss"] for entry in history for key in ("validation", "validation_ema") if key in entry]
    best = min(losses) if losses else None
    predicted = [entry["distinct_predictions"] for entry in history if "distinct_predictions" in entry]
    truths = max((entry.get("distinct_truths") or 0 for entry in history), default=0)
    reasons = []
    if predicted and max(predicted) == 1 and truths > 1:
        reasons.append(f"every evaluation ({len(predicted)}) predicted a single {answer}, the same for all of "
                       "validation")
    if baseline is not None and best is not None and best >= baseline * (1 - TOLERANCE):
        reasons.append(f"the best validation loss {best:.4f} is no better than {baseline:.4f}, the loss of predicting "
                       f"{guess} for every row")
    return {"learned": not reasons, "reasons": reasons, "baseline_loss": baseline, "best_validation_loss": best,
            "distinct_predictions": max(predicted) if predicted else None}


def warning(health: dict) -> str | None:
    """The one line a run that learned nothing ends with: what it saw and what to try; None for a run that learned."""
    if health.get("learned", True):
        return None
    return ("warning: this run learned nothing: " + "; ".join(health["reasons"]) + ". Try a lower train.lr, "
            "train.head_lr: null, more train.epochs, and `finetune validate RECIPE` for the label report")
