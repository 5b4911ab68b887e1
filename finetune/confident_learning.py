"""cleanlab's confident learning for each kind of label (one class, a label set, a tag per word): the flagged rows,
their label quality and suggestion, and cleanlab's per-class table. A leaf: problems.py chooses which one applies."""

from __future__ import annotations

import numpy as np

# an issue: (row, word or None, given label, suggested label, label quality), labels encoded as the splits hold them


def single_label_issues(scores: np.ndarray, given: np.ndarray) -> tuple[list[tuple], object]:
    """`cleanlab.filter.find_label_issues` on held-out class probabilities; quality is the self-confidence (the
    held-out probability of the given label), the suggestion the most probable class."""
    from cleanlab.dataset import rank_classes_by_label_quality
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(given, scores)
    flagged = find_label_issues(given, scores, return_indices_ranked_by="self_confidence")
    issues = [(int(i), None, int(given[i]), int(scores[i].argmax()), float(quality[i])) for i in flagged]
    return issues, rank_classes_by_label_quality(given, scores)


def multi_label_issues(scores: np.ndarray, hot: np.ndarray, threshold: float) -> tuple[list[tuple], object]:
    """cleanlab's multi-label module: a row is flagged when its label set looks wrong; the suggestion is the set the
    held-out scores put over the threshold (labels as 0/1 rows)."""
    from cleanlab.multilabel_classification.dataset import rank_classes_by_multilabel_quality
    from cleanlab.multilabel_classification.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    given = [np.flatnonzero(row).tolist() for row in hot]
    quality = get_label_quality_scores(given, scores)
    flagged = find_label_issues(given, scores, return_indices_ranked_by="self_confidence")
    issues = [(int(i), None, hot[i].astype(float), (scores[i] > threshold).astype(float), float(quality[i]))
              for i in flagged]
    return issues, rank_classes_by_multilabel_quality(given, scores)


def tag_issues(scores: list[np.ndarray], given: list[np.ndarray]) -> tuple[list[tuple], object]:
    """cleanlab's token-classification module on each sentence's words (probabilities and tags per word): (sentence,
    word) issues with the word's self-confidence; the per-class table counts words."""
    from cleanlab.dataset import rank_classes_by_label_quality
    from cleanlab.token_classification.filter import find_label_issues

    rows = [i for i, tags in enumerate(given) if len(tags)]  # a sentence cut to nothing has no word to judge
    flagged = find_label_issues([given[i].tolist() for i in rows], [scores[i] for i in rows],
                                return_indices_ranked_by="self_confidence")
    issues = []
    for s, w in flagged:
        row = rows[s]
        tag = int(given[row][w])
        issues.append((row, int(w), tag, int(scores[row][w].argmax()), float(scores[row][w][tag])))
    kept = [given[i] for i in rows]
    return issues, rank_classes_by_label_quality(np.concatenate(kept), np.concatenate([scores[i] for i in rows]))
