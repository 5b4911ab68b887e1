"""Whether an explanation is faithful, as ERASER (DeYoung et al. 2020) measures it: comprehensiveness (the score's
drop when the top words are removed) and sufficiency (its drop when only they are kept), beside random words."""

from __future__ import annotations

import json
import math

import numpy as np

from finetune.explain.methods import attribute, check_method, explainable_of

FRACTION = 0.2  # ERASER's top 20% of the words


def kept_scores(predictor, explainable, subjects: list, masks: list[np.ndarray]) -> np.ndarray:
    """The explained label's score on each input with only its masked words kept, through the predictor."""
    from finetune.problems import get

    entries = [explainable.erase(subject, mask) for subject, mask in zip(subjects, masks)]
    probabilities = get(predictor.problem).probabilities(predictor.logits(entries, progress=False))
    return np.array([row[subject.targets[0].index] for row, subject in zip(probabilities, subjects)])


def drops(predictor, explainable, subjects: list, chosen: list[np.ndarray]) -> dict:
    """Mean comprehensiveness and sufficiency when `chosen` (per input, the indices of its top words) are the
    rationale."""
    full = np.array([subject.targets[0].score for subject in subjects])
    without, only = [], []
    for subject, top in zip(subjects, chosen):
        mask = np.zeros(len(subject.units), dtype=bool)
        mask[top] = True
        without.append(~mask)
        only.append(mask)
    comprehensiveness = full - kept_scores(predictor, explainable, subjects, without)
    sufficiency = full - kept_scores(predictor, explainable, subjects, only)
    return {"comprehensiveness": float(comprehensiveness.mean()), "sufficiency": float(sufficiency.mean())}


def faithfulness(predictor, entries: list, method: str | None, steps: int, fraction: float = FRACTION,
                 seed: int = 0) -> dict:
    """{"rows", "fraction", "seed", "random": {...}, "methods": {method: {"comprehensiveness", "sufficiency",
    "comprehensiveness_ratio"}}} for the asked method, else every method that applies."""
    explainable = explainable_of(predictor)
    methods = [check_method(explainable, method)] if method else list(explainable.methods())
    subjects = [s for s in explainable.subjects(entries, None) if s.units]
    counts = [max(1, math.ceil(fraction * len(s.units))) for s in subjects]
    rng = np.random.default_rng(seed)
    random = drops(predictor, explainable, subjects,
                   [rng.choice(len(s.units), k, replace=False) for s, k in zip(subjects, counts)])
    report = {"rows": len(subjects), "fraction": fraction, "seed": seed, "random": random, "methods": {}}
    for name in methods:
        folded = attribute(explainable, subjects, name, steps)
        tops = [np.argsort(-values[0], kind="stable")[:k] for values, k in zip(folded, counts)]
        measured = drops(predictor, explainable, subjects, tops)
        base = random["comprehensiveness"]
        measured["comprehensiveness_ratio"] = measured["comprehensiveness"] / base if base > 0 else None
        report["methods"][name] = measured
    return report


def print_faithfulness(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=1))
        return
    print(f"{'method':22} {'comprehensiveness':>18} {'sufficiency':>12} {'x random':>9}")
    for name, row in report["methods"].items():
        ratio = "-" if row["comprehensiveness_ratio"] is None else f"{row['comprehensiveness_ratio']:.2f}"
        print(f"{name:22} {row['comprehensiveness']:>18.4f} {row['sufficiency']:>12.4f} {ratio:>9}")
    random = report["random"]
    print(f"{'random words':22} {random['comprehensiveness']:>18.4f} {random['sufficiency']:>12.4f} {'1.00':>9}")
    print(f"{report['rows']} rows; the top {report['fraction']:.0%} of each text's words (at least one); "
          "comprehensiveness: higher is more faithful, sufficiency: lower is")
