"""Calibrated scores: one temperature fitted on the kept model's validation logits and folded into the exported output
layer, ECE and NLL before and after, and the split-conformal confidence sets of calibration.json."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np

from finetune import problems
from finetune.errors import FinetuneError

CALIBRATION_FILE = "calibration.json"  # in the run folder and its model/: the temperature and the validation scores
ECE_BINS = 15  # equal-width bins on the confidence, as Guo et al. (2017) report ECE
# A validation split the model gets entirely right drives the fitted temperature towards 0 (every logit sharper is
# a lower NLL): the range keeps a tiny validation split from folding a 1000x into the weights.
TEMPERATURE_RANGE = (0.05, 20.0)


# ---------------------------------------------------------------------------------------------------------------
# The math: NLL, ECE, the temperature


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: over equal-width confidence bins (i/bins, (i+1)/bins], the row-weighted |accuracy - mean confidence|."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if not len(confidence):
        return 0.0
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    # sum over bins of |B|/n * |accuracy(B) - confidence(B)| = sum of |right(B) - confidence sum(B)| / n
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / len(confidence))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per bin: rows, mean confidence, accuracy (None where empty): what plots/reliability.png draws."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)

    def mean(values):
        return [float(v / n) if n else None for v, n in zip(np.bincount(which, values, bins), count)]

    return {"count": count.tolist(), "confidence": mean(confidence), "accuracy": mean(correct)}


def scores_at(problem, logits, labels, temperature: float) -> dict:
    """{"ece", "nll"} of the problem's scores of logits / temperature (NLL: the problem's loss, e.g. cross-entropy).

    ECE's decisions are the problem's own (Problem.reliability): the top label for one label per input, every
    token's top tag for tags (the ignored positions left out), each label's yes/no at 0.5 for a label set."""
    scaled = logits / temperature
    confidence, correct = problem.reliability(problem.probabilities(scaled.numpy()), labels.numpy())
    return {"ece": expected_calibration_error(confidence, correct), "nll": float(problem.loss(scaled, labels))}


def fit_temperature(problem, logits, labels) -> float:
    """The T minimising the problem's NLL of logits / T: L-BFGS on log T (T stays positive), as Guo et al. (2017)
    and the common implementations fit it; kept inside TEMPERATURE_RANGE, and 1 where fitting did not help."""
    import torch

    logits = logits.detach().float()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = problem.loss(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    found = float(log_t.detach().exp())
    if not math.isfinite(found):
        return 1.0
    found = min(max(found, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])
    with torch.no_grad():
        better = float(problem.loss(logits / found, labels)) <= float(problem.loss(logits, labels))
    return found if better else 1.0


def conformal_cutoff(scores, level: float) -> float:
    """The score a label needs to be in a split-conformal set at `level`: 1 - q, q the ceil((n+1) level)-th smallest
    of the n validation scores (1 - the true label's score); at most every label where n is too small for `level`."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * level)
    if rank > len(scores):
        return 0.0  # every label: n validation rows cannot promise this level
    return float(1.0 - scores[rank - 1])


# ---------------------------------------------------------------------------------------------------------------
# A run: fitting after the kept model is tested


def calibrate(run, metrics: dict) -> None:
    """eval.calibrate on the kept model: metrics.json's `calibration` and the run folder's calibration.json (the
    temperature is folded into the model to export by `fold_into`). Every process takes part (the logits are
    gathered); the main one writes."""
    problem = problems.get(run.recipe.head.problem)
    if not problem.calibrates():
        return
    wanted = run.recipe.eval.calibrate
    if "validation" not in run.loaders or not len(run.loaders["validation"]):
        metrics["calibration"] = {"method": None, "note": "not calibrated: the run has no validation split"}
        run.say(metrics["calibration"]["note"])
        return
    validation = _rows_of(run, "validation", problem)
    test = _rows_of(run, "test", problem) if "test" in run.loaders else None
    temperature = fit_temperature(problem, *validation) if wanted == "temperature" else 1.0
    record = _record(problem, wanted, temperature, validation, test, run.recipe.head.threshold)
    metrics["calibration"] = record
    if test is not None:  # the exported model's own test loss (its labels, hence its other metrics, are unchanged)
        metrics["test"]["loss"] = record["test"]["nll"]
    if run.accelerator.is_main_process:
        _write_calibration_file(Path(run.recipe.output.dir), problem, record, validation)
    run.say(_log_line(record))


def _rows_of(run, split: str, problem):
    """The kept model's (logits, labels) over a split, as evaluate_split gathers them, in the rows the problem
    calibrates on (the tagged tokens for tags)."""
    import torch

    from finetune.loop import logits_of

    accelerator, model = run.accelerator, run.model
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in run.loaders[split]:
            truth = batch.pop("labels")
            with accelerator.autocast():
                output = logits_of(model(**batch))
            output, truth = problem.gather(accelerator, output.float(), truth)
            rows, row_labels = problem.calibration_rows(output.cpu(), truth.cpu())
            logits.append(rows)
            labels.append(row_labels)
    return torch.cat(logits), torch.cat(labels)


def _record(problem, wanted, temperature: float, validation, test, threshold: float) -> dict:
    """metrics.json's `calibration`: after (at T) and before (T = 1), validation and test, with the bins drawn."""
    after = {"validation": scores_at(problem, *validation, temperature),
             "test": scores_at(problem, *test, temperature) if test is not None else None}
    before = {"validation": scores_at(problem, *validation, 1.0),
              "test": scores_at(problem, *test, 1.0) if test is not None else None}
    drawn_split, (logits, labels) = ("test", test) if test is not None else ("validation", validation)
    bins = {}
    for key, t in (("before", 1.0), ("after", temperature)):
        bins[key] = reliability_bins(*problem.reliability(problem.probabilities((logits / t).numpy()), labels.numpy()))
    record = {"method": wanted, "temperature": temperature, **after, "before": before,
              "reliability": {"split": drawn_split, **bins}}
    moved = problem.moved_threshold(threshold, temperature) if temperature != 1.0 else threshold
    if moved != threshold:
        record["threshold"] = {"before": threshold, "after": moved}
    return record


def _write_calibration_file(out: Path, problem, record: dict, validation) -> None:
    """calibration.json: the temperature, and (where sets apply) the validation rows' conformal scores, sorted."""
    content = {"method": record["method"], "temperature": record["temperature"], "problem": problem.name}
    if "threshold" in record:
        content["threshold"] = record["threshold"]
    if problem.confidence_set_refusal is None:
        logits, labels = validation
        scores = problem.conformal_scores(problem.probabilities((logits / record["temperature"]).numpy()),
                                          labels.numpy())
        content["conformal"] = {"score": "1 - the true label's score (split conformal, on the validation rows)",
                                "validation_scores": sorted(round(float(s), 7) for s in scores)}
    (out / CALIBRATION_FILE).write_text(json.dumps(content) + "\n")


def _log_line(record: dict) -> str:
    split = "test" if record.get("test") else "validation"
    after, before = record[split], record["before"][split]
    numbers = (f"{split} ECE {before['ece']:.4f} -> {after['ece']:.4f}, NLL {before['nll']:.4f} -> "
               f"{after['nll']:.4f}")
    if record["method"] is None:
        return f"not calibrated (eval.calibrate: null): {split} ECE {after['ece']:.4f}, NLL {after['nll']:.4f}"
    return f"calibrated: temperature {record['temperature']:.4g} fitted on validation; {numbers}"


# ---------------------------------------------------------------------------------------------------------------
# Export: the fold, the moved threshold, the card's line


def temperature_of(metrics: dict) -> float | None:
    """The temperature the run fitted (None where it fitted none)."""
    record = metrics.get("calibration") or {}
    return record.get("temperature") if record.get("method") is not None else None


def fold_into(final, metrics: dict) -> None:
    """The fitted temperature divided into the output layer of the model the run exports (whole; still LoRA-wrapped,
    so the adapter's head holds it too, as the merged weights do); `final` None: a process that exports nothing."""
    from finetune import transfer
    from finetune.model import fold_temperature

    temperature = temperature_of(metrics)
    if final is not None and temperature is not None and temperature != 1.0:
        fold_temperature(transfer.unwrap_lora(final), temperature)


@contextlib.contextmanager
def exported_threshold(recipe, metrics: dict):
    """Within: recipe.head.threshold is the one moved with the logits (a label set's), so the task's save and the
    model folder's configs keep the threshold its calibrated scores decide at."""
    moved = (metrics.get("calibration") or {}).get("threshold")
    if moved is None:
        yield
        return
    recipe.head.threshold = moved["after"]
    try:
        yield
    finally:
        recipe.head.threshold = moved["before"]


def exported_head(head, metrics: dict):
    """recipe.head as the model folder decides: with the moved threshold where calibration moved it."""
    import dataclasses

    moved = (metrics.get("calibration") or {}).get("threshold")
    return head if moved is None else dataclasses.replace(head, threshold=moved["after"])


def card_line(metrics: dict) -> str | None:
    """The card's sentence on the scores' calibration (None where the run says nothing about it)."""
    record = metrics.get("calibration")
    if not record:
        return None
    if record.get("note"):
        return f"Scores are {record['note']}."
    split = "test" if record.get("test") else "validation"
    after, before = record[split], record["before"][split]
    if record["method"] is None:
        return (f"Scores are not calibrated (`eval.calibrate: null`): {split} ECE {after['ece']:.4f} "
                f"(15 bins), NLL {after['nll']:.4f}.")
    return (f"Scores are calibrated: temperature {record['temperature']:.4g}, fitted on the validation split and "
            f"folded into the last layer; {split} ECE {after['ece']:.4f} (15 bins; {before['ece']:.4f} before), "
            f"NLL {after['nll']:.4f} ({before['nll']:.4f} before). Predicted labels are unchanged.")


def copy_into(model_dir: Path, run_dir: Path) -> None:
    """The run's calibration.json into its model folder (confidence sets read it there)."""
    source = Path(run_dir) / CALIBRATION_FILE
    if source.is_file():
        (Path(model_dir) / CALIBRATION_FILE).write_text(source.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Confidence sets at prediction time


def set_cutoff(folder: Path | None, problem_name: str, level, field: str) -> float:
    """The score a label needs to join a confidence set at `level`, from the model folder's calibration.json; one
    FinetuneError line (naming `field`) for a bad level, a problem without sets or a folder without the file."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise FinetuneError(f"{field}: must be a coverage level between 0 and 1 (such as 0.9), got {level!r}")
    refusal = problems.get(problem_name).confidence_set_refusal
    if refusal is not None:
        raise FinetuneError(f"{field}: not for this model: {refusal}; confidence sets need one label per input")
    path = Path(folder) / CALIBRATION_FILE if folder is not None else None
    if path is None or not path.is_file():
        raise FinetuneError(f"{field}: the model folder has no {CALIBRATION_FILE} (the validation scores sets need): "
                            "retrain it with this version of finetune")
    try:
        scores = json.loads(path.read_text())["conformal"]["validation_scores"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise FinetuneError(f"{path}: holds no validation scores for confidence sets; retrain the model") from None
    return conformal_cutoff(scores, float(level))
