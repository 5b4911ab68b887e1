"""The problems a head solves (one label, a label set, a number, a tag per word), one class each answering
finetune.problem_base.Problem's questions their own way, and PROBLEMS, the table callers look them up in."""

from __future__ import annotations

import math

import numpy as np

from finetune.errors import FinetuneError
from finetune.label_cells import class_name, entropy, label_set, one_spelling, present_kinds
from finetune.problem_base import IGNORE_INDEX, NO_LABEL, Problem  # noqa: F401 (read through problems too)


class SingleLabel(Problem):
    name = "single_label"
    native_type = "single_label_classification"
    default_metrics = ("accuracy", "f1_macro")
    single_class = True
    confidence_set_refusal = None

    def check_labels(self, values, where, key) -> None:
        one_spelling(values, present_kinds(values, where, key, "label", blank_is_missing=True), where, key)

    def label_space(self, values, source):
        ordered = super().label_space(values, source)
        if len(ordered) < 2:
            raise FinetuneError(
                f"{source}: the training data has only {len(ordered)} label(s); a classifier needs two or more"
            )
        return ordered

    def strata(self, values):
        return [class_name(v) for v in values]

    def loss(self, logits, labels, label_smoothing: float = 0.0, class_weights=None):
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), labels, weight=class_weights, label_smoothing=label_smoothing)

    def predict(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return logits.argmax(axis=-1)

    def details(self, truth, predictions, label_names) -> dict:
        from sklearn.metrics import confusion_matrix

        matrix = confusion_matrix(truth, predictions, labels=list(range(len(label_names))))
        return {"confusion": {"labels": list(label_names), "matrix": matrix.tolist()}}

    def label_similarity(self, a, b):
        """1 for the same class, else 0 (sentence-transformers' pairs for CosineSimilarityLoss)."""
        return (a[:, None] == b[None, :]).float()


class MultiLabel(Problem):
    name = "multi_label"
    native_type = "multi_label_classification"
    default_metrics = ("f1_micro", "f1_macro", "accuracy")
    empty_rows = True
    answer = "label set"
    confidence_set_refusal = "a multi-label model decides each label on its own (its threshold does)"
    onnx_decode = ('print([[name for name, x in zip(info["labels"], row) if 1 / (1 + np.exp(-x)) > info["threshold"]]'
                   ' for row in logits])')
    timm_decode = ('labels = model.pretrained_cfg["label_names"]\n'
                   "print({labels[i]: round(p, 4) for i, p in enumerate(logits.sigmoid().tolist())})\n")

    def names_in(self, value):
        return label_set(value)

    def label_key(self, value):
        return tuple(sorted(label_set(value)))

    def check_labels(self, values, where, key) -> None:
        return  # an empty label cell is an empty label set

    def encode_names(self, wanted, index):
        hot = [0.0] * len(index)
        for name in wanted:
            hot[index[name]] = 1.0
        return hot

    def loss(self, logits, labels, label_smoothing: float = 0.0, class_weights=None):
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def predict(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-logits)) > threshold).astype(np.int64)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))

    def reliability(self, probabilities, labels):
        """Each label's own yes/no decision at 0.5: its binary confidence, and whether it is right."""
        flat, truth = probabilities.reshape(-1), labels.reshape(-1) > 0.5
        return np.maximum(flat, 1.0 - flat), (flat > 0.5) == truth

    def moved_threshold(self, threshold, temperature):
        """sigmoid(z) > t  <=>  sigmoid(z / T) > sigmoid(logit(t) / T)."""
        return float(1.0 / (1.0 + math.exp(-math.log(threshold / (1.0 - threshold)) / temperature)))

    def decode_row(self, row, order, ranked, labels, threshold) -> dict:
        """{"labels": those over the threshold, best first, "scores": [...]}."""
        return {"labels": [labels[j] for j in order if row[j] > threshold], "scores": ranked}

    def agreement(self, logits, reference, threshold: float = 0.5):
        chosen = [1 / (1 + np.exp(-x)) > threshold for x in (logits, reference)]
        return float(np.mean(np.all(chosen[0] == chosen[1], axis=-1)))

    def in_units(self, truth, predictions, splits):
        return truth.astype(np.int64), predictions

    def label_counts(self, encoded: list, count: int) -> list[int]:
        return [int(v) for v in np.asarray(encoded, dtype=np.float64).reshape(len(encoded), count).sum(axis=0)]

    def summary(self, encoded, splits) -> dict:
        return {**super().summary(encoded, splits), "unlabelled": sum(1 for row in encoded if not any(row))}

    def baseline_loss(self, encoded, count):
        """Each label's own prior (its binary entropy), averaged over the labels as the loss averages them."""
        rows = max(len(encoded), 1)
        return float(np.mean([entropy([n, rows - n]) for n in self.label_counts(encoded, count)] or [0.0]))

    def distinct(self, values):
        values = np.asarray(values)
        return int(len(np.unique(values.reshape(len(values), -1), axis=0)))  # label sets, not labels

    def details(self, truth, predictions, label_names) -> dict:
        from sklearn.metrics import precision_recall_fscore_support

        _, _, f1, support = precision_recall_fscore_support(truth, predictions, average=None, zero_division=0)
        return {"per_label": {"labels": list(label_names), "f1": f1.tolist(), "support": support.tolist()}}

    def label_text(self, value, labels):
        return "|".join(name for name, on in zip(labels, value) if on)

    def predicted_text(self, result, labels):
        return "|".join(sorted(result["labels"], key=labels.index))

    def unlabelled(self, names):
        return [float("nan")] * len(names)

    def soft_loss(self, logits, teacher, labels, temperature: float):
        from finetune.soft_targets import binary_kl  # per label: the labels are independent

        return binary_kl(logits, teacher, temperature)

    def config_fields(self, head) -> dict:
        return {"threshold": head.threshold}

    def read_config_fields(self, kept) -> dict:
        if isinstance(kept, dict) and kept.get("threshold") is not None:
            return {"threshold": float(kept["threshold"])}
        return {}

    def card_sentence(self, kind, labels, column):
        return f"tags {kind}s with any number of {len(labels)} labels (an independent score per label)"

    def card_labels_note(self, head) -> str:
        return f" (threshold {head.threshold})"

    def card_output_note(self, head) -> str:
        return f"\nScores are per-label sigmoids; a label applies when its score exceeds {head.threshold}.\n"

    def card_data_note(self):
        return "A row can carry several labels, so the label counts can add up to more than the rows."

    def row_classes(self, value):
        """Each label of the row; a row without any counts for one more class, so some label-free rows stay."""
        return label_set(value) or [NO_LABEL]

    def label_similarity(self, a, b):
        """The Jaccard similarity of the two label sets (1 for the same set, two empty sets included; 0 disjoint)."""
        a, b = a.float(), b.float()
        shared = a @ b.T
        union = a.sum(1)[:, None] + b.sum(1)[None, :] - shared
        return (shared / union.clamp(min=1)).masked_fill(union == 0, 1.0)

    def label_issues(self, outputs, labels, threshold: float = 0.5):
        from finetune.confident_learning import multi_label_issues

        return multi_label_issues(self.probabilities(np.stack(outputs)), np.asarray(labels) > 0.5, threshold)


class Regression(Problem):
    name = "regression"
    native_type = "regression"
    default_metrics = ("rmse", "mae", "r2", "pearson", "spearman")
    has_labels = False
    baseline_guess = "the training targets' mean"
    confidence_set_refusal = "a regression model predicts a number, not a label"
    onnx_decode = "print(logits[:, 0].tolist())"  # the value in the targets' units, as predict prints it
    timm_decode = "print(logits.item())\n"

    def num_outputs(self, label_names) -> int:
        return 1

    def calibrates(self):
        return False  # a number has no temperature

    def check_labels(self, values, where, key) -> None:
        # encode names any target that is not a finite number
        present_kinds(values, where, key, "regression target (empty or NaN)", blank_is_missing=False)

    def label_space(self, values, source):
        return None

    def encode(self, values, names, where, key) -> list:
        targets = []
        for i, value in enumerate(values):
            try:
                number = math.nan if isinstance(value, (bool, np.bool_)) else float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise FinetuneError(f"{where(i)}: regression target {value!r} is not a finite number")
            targets.append(number)
        return targets

    def standardise(self, encoded):
        targets = np.asarray(encoded["train"], dtype=np.float64)
        mean, std = float(targets.mean()), float(targets.std()) or 1.0
        scaled = {key: None if part is None else [(t - mean) / std for t in part] for key, part in encoded.items()}
        return scaled, mean, std

    def split_info(self, mean, std) -> dict:
        return {"target": {"mean": mean, "std": std}}

    def target_scaling(self, splits):
        return splits.target_mean, splits.target_std

    def baseline_loss(self, encoded, count):
        """Training standardises the targets: predicting their mean scores their variance, 1."""
        return 1.0

    def distinct(self, values):
        return None

    def summary(self, encoded, splits) -> dict:
        targets = np.asarray(encoded, dtype=np.float64) * splits.target_std + splits.target_mean
        return {"targets": {"mean": float(targets.mean()), "std": float(targets.std()),
                            "min": float(targets.min()), "max": float(targets.max())}}

    def truth_array(self, encoded):
        return np.asarray(encoded, dtype=np.float64)

    def loss(self, logits, labels, label_smoothing: float = 0.0, class_weights=None):
        import torch.nn.functional as F

        return F.mse_loss(logits.float().view(-1), labels.float().view(-1))  # on standardised targets

    def predict(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return logits.reshape(-1)

    def decode(self, logits, labels, threshold: float = 0.5, top_k: int | None = None) -> list[dict]:
        """{"value": the prediction in the training targets' units} per row."""
        return [{"value": float(row.reshape(-1)[0])} for row in logits]

    def agreement(self, logits, reference, threshold: float = 0.5):
        return None  # a number is near, not equal: max_abs_logit_diff says how near

    def in_units(self, truth, predictions, splits):
        """Metrics in the targets' own units (training standardises them)."""
        mean, std = splits.target_mean, splits.target_std
        return truth.reshape(-1) * std + mean, predictions * std + mean

    def held_out_loss(self, logits, encoded, scaling) -> dict:
        """The MSE on the run's standardised targets, where its split.json says how (the model predicts in units)."""
        known = scaling()
        if known is None:
            return {}
        mean, std = known
        truth, predictions = np.asarray(encoded, dtype=np.float64), self.predict(logits)
        return {"loss": float(np.mean(((predictions - mean) / std - (truth - mean) / std) ** 2))}

    def label_text(self, value, labels):
        return float(value)

    def record(self, result, truth, labels) -> dict:
        return {"predicted": result["value"], "error": result["value"] - float(truth)}

    def unlabelled(self, names):
        return float("nan")

    def teacher_space(self, logits, splits):
        return (logits - splits.target_mean) / splits.target_std  # the teacher predicts in the targets' units

    def soft_loss(self, logits, teacher, labels, temperature: float):
        from finetune.soft_targets import squared_distance  # a number has no distribution to soften: no T

        return squared_distance(logits, teacher)

    def native_config(self, labels) -> dict:
        return {"num_labels": 1, "problem_type": self.native_type}

    def labels_of_config(self, config):
        return None

    def card_sentence(self, kind, labels, column):
        return f"predicts a number (`{column}`, in the training targets' own units) from a {kind}"

    def card_output_note(self, head) -> str:
        return "\nThe output is the predicted value, in the training targets' own units.\n"

    def few_label_refusal(self):
        return "head.problem=regression predicts a number: its rows have no classes to count or pair"

    def row_classes(self, value):
        raise FinetuneError(f"data.train_per_class: {self.few_label_refusal()}")

    audit_refusal = ("audit: regression has no classes for confident learning to find flipped; cleanlab's regression "
                     "module (cleanlab.regression.learn.CleanLearning) fits its own model on the inputs instead of "
                     "reading held-out class scores, so it is not wired in; audit a classification recipe")


class Tags(Problem):
    """A tag per word (token classification): logits are (batch, tokens, tags), labels IGNORE_INDEX where a token
    carries no word's tag; metrics are entity-level (seqeval) over the words' tags."""

    name = "tags"
    native_type = None
    answer = "tag"
    confidence_set_refusal = "a token-classification model tags each word; its sets would be per word"
    default_metrics = ("f1", "precision", "recall", "token_accuracy")

    def loss(self, logits, labels, label_smoothing: float = 0.0, class_weights=None):
        import torch.nn.functional as F

        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=label_smoothing)

    def predict(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return logits.argmax(axis=-1)

    def calibration_rows(self, logits, labels):
        """One row per tagged token (the ignored positions left out)."""
        kept = labels != IGNORE_INDEX
        return logits[kept], labels[kept]

    def label_counts(self, encoded: list, count: int) -> list[int]:
        """Words per tag."""
        flat = [tag for row in encoded for tag in row]
        return [int(v) for v in np.bincount(np.asarray(flat, dtype=np.int64), minlength=count)]

    def gather(self, accelerator, logits, labels):
        # sentences of different lengths on different processes: pad to one length before gathering
        logits = accelerator.pad_across_processes(logits, dim=1, pad_index=0)
        labels = accelerator.pad_across_processes(labels, dim=1, pad_index=IGNORE_INDEX)
        return accelerator.gather_for_metrics((logits, labels))

    def score(self, batches, metric_names, splits, threshold: float = 0.5, details: dict | None = None,
              variety: dict | None = None) -> dict:
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
        if variety is not None:  # the words' tags
            variety.update(predicted=self.distinct([t for row in predicted_rows for t in row]),
                           true=self.distinct([t for row in true_rows for t in row]))
        return results

    def soft_targets(self, rows, labels):
        from finetune.soft_targets import words_on_labelled_positions  # per word, on its first sub-token

        return words_on_labelled_positions(rows, labels, IGNORE_INDEX)

    def soft_loss(self, logits, teacher, labels, temperature: float):
        """The KL per tagged sub-token (labels not ignored, the word seen by the teacher), averaged over them."""
        from finetune.soft_targets import masked_softmax_kl

        return masked_softmax_kl(logits, teacher, (labels != IGNORE_INDEX) & teacher.isfinite().all(-1), temperature)

    def native_config(self, labels) -> dict:
        labels = labels or []  # transformers' token classes have no problem_type
        return {"id2label": {str(i): name for i, name in enumerate(labels)},
                "label2id": {name: i for i, name in enumerate(labels)}}

    def card_sentence(self, kind, labels, column):
        from finetune.tasks.token_classification.tags import entity_types

        types = entity_types(labels)
        named = f" ({', '.join(types)})" if types else ""
        return (f"tags each word of a {kind} with one of {len(labels)} tags, from which it reads the entities "
                f"(a span of words and its type{named})")

    def card_data_note(self):
        return "Rows are sentences; the tag counts are words."

    def row_classes(self, value):
        """A sentence counts for each entity type it holds; one without any entity counts for one more class."""
        from finetune.tasks.token_classification.tags import entity_types

        return entity_types(list(value)) or [NO_LABEL]

    def label_issues(self, outputs, labels, threshold: float = 0.5):
        """Each sentence's words, scored on their first sub-token (padding and continuations carry IGNORE_INDEX)."""
        from finetune.confident_learning import tag_issues

        words = [np.asarray(row) != IGNORE_INDEX for row in labels]
        return tag_issues([self.probabilities(np.asarray(out)[: len(m)][m]) for out, m in zip(outputs, words)],
                          [np.asarray(row)[m] for row, m in zip(labels, words)])


PROBLEMS: dict[str, Problem] = {p.name: p for p in (SingleLabel(), MultiLabel(), Regression(), Tags())}


def get(name: str) -> Problem:
    return PROBLEMS[name]
