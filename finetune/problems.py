"""The problems a head solves (one label, a label set, a number, a tag per word): each one's loss, how its logits
become predictions and scores, its default metrics, how an evaluation is gathered and scored, and its details."""

from __future__ import annotations

from typing import Sequence

import numpy as np

IGNORE_INDEX = -100  # label of a position that has none (special tokens, continuation sub-tokens, padding)


class Problem:
    """What the loop, evaluation, predict and export ask of a problem; one subclass per problem, listed in PROBLEMS."""

    name: str
    native_type: str | None = None  # transformers' config.problem_type for it
    default_metrics: tuple[str, ...] = ()
    # the export card's last line: numpy that prints what `finetune predict` names, from `logits` and export.json
    onnx_decode: str = 'print([info["labels"][i] for i in logits.argmax(-1)])'

    def num_outputs(self, label_names: Sequence[str] | None) -> int:
        return len(label_names)

    def loss(self, logits, labels, label_smoothing: float = 0.0, class_weights=None):
        raise NotImplementedError

    def predict(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """What the model predicts from raw outputs (numpy)."""
        raise NotImplementedError

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Scores in [0, 1] as the loss defines them (softmax over the last axis)."""
        logits = np.asarray(logits, dtype=np.float64)
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)

    def label_counts(self, encoded: list, count: int) -> list[int]:
        """Rows per label (encoded as the splits hold them)."""
        return [int(v) for v in np.bincount(np.asarray(encoded, dtype=np.int64), minlength=count)]

    # evaluation: batches are gathered across processes, moved to the host, then scored together

    def gather(self, accelerator, logits, labels):
        return accelerator.gather_for_metrics((logits, labels))

    def score(self, batches: list, metric_names: Sequence[str], splits, threshold: float = 0.5,
              details: dict | None = None) -> dict:
        """{"loss", metric: value} over (logits, labels) batches on the host; `details` filled when given."""
        import torch

        from finetune.metrics import compute_metrics

        logits = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        results = {"loss": float(self.loss(logits, labels))}
        truth, predictions = self.in_units(labels.numpy(), self.predict(logits.numpy(), threshold), splits)
        results.update(compute_metrics(list(metric_names), truth, predictions))
        if details is not None:
            details.update(self.details(truth, predictions, splits.label_names))
        return results

    def in_units(self, truth: np.ndarray, predictions: np.ndarray, splits) -> tuple[np.ndarray, np.ndarray]:
        """Truth and predictions as metrics read them."""
        return truth, predictions

    def details(self, truth, predictions, label_names) -> dict:
        """What a table of averages hides (rows: truth, columns: prediction)."""
        return {}


class SingleLabel(Problem):
    name = "single_label"
    native_type = "single_label_classification"
    default_metrics = ("accuracy", "f1_macro")

    def loss(self, logits, labels, label_smoothing: float = 0.0, class_weights=None):
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), labels, weight=class_weights, label_smoothing=label_smoothing)

    def predict(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return logits.argmax(axis=-1)

    def details(self, truth, predictions, label_names) -> dict:
        from sklearn.metrics import confusion_matrix

        matrix = confusion_matrix(truth, predictions, labels=list(range(len(label_names))))
        return {"confusion": {"labels": list(label_names), "matrix": matrix.tolist()}}


class MultiLabel(Problem):
    name = "multi_label"
    native_type = "multi_label_classification"
    default_metrics = ("f1_micro", "f1_macro", "accuracy")
    onnx_decode = ('print([[name for name, x in zip(info["labels"], row) if 1 / (1 + np.exp(-x)) > info["threshold"]]'
                   ' for row in logits])')

    def loss(self, logits, labels, label_smoothing: float = 0.0, class_weights=None):
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def predict(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-logits)) > threshold).astype(np.int64)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))

    def in_units(self, truth, predictions, splits):
        return truth.astype(np.int64), predictions

    def label_counts(self, encoded: list, count: int) -> list[int]:
        return [int(v) for v in np.asarray(encoded, dtype=np.float64).reshape(-1, count).sum(axis=0)]

    def details(self, truth, predictions, label_names) -> dict:
        from sklearn.metrics import precision_recall_fscore_support

        _, _, f1, support = precision_recall_fscore_support(truth, predictions, average=None, zero_division=0)
        return {"per_label": {"labels": list(label_names), "f1": f1.tolist(), "support": support.tolist()}}


class Regression(Problem):
    name = "regression"
    native_type = "regression"
    default_metrics = ("rmse", "mae", "r2", "pearson", "spearman")
    onnx_decode = "print(logits[:, 0].tolist())"  # the value in the targets' units, as predict prints it

    def num_outputs(self, label_names) -> int:
        return 1

    def loss(self, logits, labels, label_smoothing: float = 0.0, class_weights=None):
        import torch.nn.functional as F

        return F.mse_loss(logits.float().view(-1), labels.float().view(-1))  # on standardised targets

    def predict(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return logits.reshape(-1)

    def in_units(self, truth, predictions, splits):
        """Metrics in the targets' own units (training standardises them)."""
        mean, std = splits.target_mean, splits.target_std
        return truth.reshape(-1) * std + mean, predictions * std + mean


class Tags(Problem):
    """A tag per word (token classification): logits are (batch, tokens, tags), labels IGNORE_INDEX where a token
    carries no word's tag; metrics are entity-level (seqeval) over the words' tags."""

    name = "tags"
    native_type = None
    default_metrics = ("f1", "precision", "recall", "token_accuracy")

    def loss(self, logits, labels, label_smoothing: float = 0.0, class_weights=None):
        import torch.nn.functional as F

        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=label_smoothing)

    def predict(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return logits.argmax(axis=-1)

    def label_counts(self, encoded: list, count: int) -> list[int]:
        """Words per tag."""
        flat = [tag for row in encoded for tag in row]
        return [int(v) for v in np.bincount(np.asarray(flat, dtype=np.int64), minlength=count)]

    def gather(self, accelerator, logits, labels):
        # sentences of different lengths on different processes: pad to one length before gathering
        logits = accelerator.pad_across_processes(logits, dim=1, pad_index=0)
        labels = accelerator.pad_across_processes(labels, dim=1, pad_index=IGNORE_INDEX)
        return accelerator.gather_for_metrics((logits, labels))

    def score(self, batches, metric_names, splits, threshold: float = 0.5, details: dict | None = None) -> dict:
        import torch
        import torch.nn.functional as F

        from finetune.metrics import evaluate_value, is_evaluate
        from finetune.tasks.token_classification import tags as tc

        loss_sum, counted, true_rows, predicted_rows = 0.0, 0, [], []
        for logits, labels in batches:
            flat_logits, flat_labels = logits.float().flatten(0, -2), labels.flatten()
            loss_sum += float(F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"))
            counted += int((flat_labels != IGNORE_INDEX).sum())
            truth, predicted = tc.labelled_sequences(labels.tolist(), torch.argmax(logits, -1).tolist())
            true_rows += truth
            predicted_rows += predicted
        names = splits.label_names
        scores = tc.tag_metrics(true_rows, predicted_rows, names)
        results = {"loss": loss_sum / max(counted, 1)}
        for name in metric_names:  # built-ins from one seqeval pass; evaluate modules get the rows of tag names
            results[name] = evaluate_value(name, tc.tag_rows(true_rows, names), tc.tag_rows(predicted_rows, names)) \
                if is_evaluate(name) else scores[name]
        if details is not None:
            details.update(tc.tag_details(true_rows, predicted_rows, names))
        return results


PROBLEMS: dict[str, Problem] = {p.name: p for p in (SingleLabel(), MultiLabel(), Regression(), Tags())}


def get(name: str) -> Problem:
    return PROBLEMS[name]
