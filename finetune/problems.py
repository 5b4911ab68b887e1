"""The problems a head solves (one label, a label set, a number, a tag per word): each one's labels (how a cell is
read, checked and encoded, the label space), loss, how its logits become predictions, scores and `predict`'s JSON,
its default metrics, how an evaluation is gathered and scored, its details, and what its exports and card say."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from finetune.errors import FinetuneError

IGNORE_INDEX = -100  # label of a position that has none (special tokens, continuation sub-tokens, padding)
Where = Callable[[int], str]  # a row's position -> where its user finds it ("train.csv line 12")


# ---------------------------------------------------------------------------------------------------------------
# Label cells as users write them.


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


def _present(values: list, where: Where, key: str, what: str, blank_is_missing: bool) -> dict[str, list[int]]:
    """Positions per kind of cell (value_kind); a missing cell (or a blank one, where that means missing) is refused."""
    kinds: dict[str, list[int]] = {}
    for i, label in enumerate(values):
        if is_missing(label) or (blank_is_missing and not class_name(label)):
            raise FinetuneError(f"{where(i)}: missing {what}; every row of {key} needs one")
        kinds.setdefault(value_kind(label), []).append(i)
    return kinds


def _one_spelling(values: list, kinds: dict[str, list[int]], where: Where, key: str) -> None:
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


class Problem:
    """What the loop, data, evaluation, predict and export ask of a problem; one subclass per problem, listed in
    PROBLEMS. Callers ask these methods and never compare a problem's name."""

    name: str
    native_type: str | None = None  # transformers' config.problem_type for it
    default_metrics: tuple[str, ...] = ()
    has_labels: bool = True  # False: the model predicts a number (no label space, no class folders, no label table)
    single_class: bool = False  # one class per row: class weights, the balanced sampler and mixup apply to it
    empty_rows: bool = False  # a row may hold no label at all (the data report counts those rows)
    answer: str = "class"  # what one prediction is, in words (finetune.health's "a single class")
    baseline_guess: str = "the training label frequencies"  # what baseline_loss predicts for every row, in words
    # why a confidence set (split conformal over one label per input) does not apply; None: it does
    confidence_set_refusal: str | None = "its model does not choose one label per input"
    # the export card's last line: numpy that prints what `finetune predict` names, from `logits` and export.json
    onnx_decode: str = 'print([info["labels"][i] for i in logits.argmax(-1)])'
    # the timm card's last lines, after `logits = model(...)[0]`: what the model says about one image
    timm_decode: str = ('labels = model.pretrained_cfg["label_names"]\n'
                        "print({labels[i]: round(p, 4) for i, p in enumerate(logits.softmax(-1).tolist())})\n")

    def num_outputs(self, label_names: Sequence[str] | None) -> int:
        return len(label_names)

    # labels as the data holds them: read, checked, encoded

    def names_in(self, value: Any) -> list[str]:
        """The label names one cell holds."""
        return [class_name(value)]

    def label_key(self, value: Any):
        """What a cell's labels compare as (two rows with one input and different keys conflict)."""
        return class_name(value)

    def check_labels(self, values: list, where: Where, key: str) -> None:
        """Refuse cells no encoding reads (FinetuneError naming the row by `where(position)`)."""
        _one_spelling(values, _present(values, where, key, "label", blank_is_missing=False), where, key)

    def label_space(self, values: list, source: str) -> list[str] | None:
        """The label names training's cells hold, sorted (numbers numerically); None where outputs are a number."""
        return sorted({name for value in values for name in self.names_in(value)}, key=sort_key)

    def strata(self, values: list) -> list[str]:
        """What a held-out validation part is stratified on: one stratum unless a row is one class."""
        return ["0"] * len(values)

    def encode(self, values: list, names: list[str] | None, where: Where, key: str) -> list:
        """The cells as the splits hold them: a name unseen in training is refused."""
        index = {name: i for i, name in enumerate(names)}
        encoded = []
        for i, value in enumerate(values):
            wanted = self.names_in(value)
            for name in wanted:
                if name not in index:
                    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                    raise FinetuneError(
                        f"{where(i)}: label '{name}' in {key} is not among the training labels ({shown}); "
                        "add training examples of it or drop those rows"
                    )
            encoded.append(self.encode_names(wanted, index))
        return encoded

    def encode_names(self, wanted: list[str], index: dict[str, int]):
        """One row's encoding of the names it holds."""
        return index[wanted[0]]

    def standardise(self, encoded: dict[str, list | None]) -> tuple[dict[str, list | None], float, float]:
        """(encoded splits, mean, std) as training sees them; only a number is standardised (on train's)."""
        return encoded, 0.0, 1.0

    def split_info(self, mean: float, std: float) -> dict:
        """What split.json records beside the labels to undo `standardise`."""
        return {}

    def target_scaling(self, splits) -> tuple[float, float] | None:
        """(mean, std) the exported head is folded with, so it predicts in the targets' own units; None: none."""
        return None

    def label_counts(self, encoded: list, count: int) -> list[int]:
        """Rows per label (encoded as the splits hold them)."""
        return [int(v) for v in np.bincount(np.asarray(encoded, dtype=np.int64), minlength=count)]

    def summary(self, encoded: list, splits) -> dict:
        """A split's labels as the data report counts them (SplitSummary's fields)."""
        counts = self.label_counts(encoded, len(splits.label_names))
        return {"counts": dict(zip(splits.label_names, counts))}

    def truth_array(self, encoded: list) -> np.ndarray:
        """Encoded labels as metrics read them."""
        return np.asarray(encoded, dtype=np.int64)

    # outputs

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

    def decode(self, logits: np.ndarray, labels: list[str] | None, threshold: float = 0.5,
               top_k: int | None = None) -> list[dict]:
        """`predict`'s JSON, one dict per row of logits: {"label", "score", "scores": [{"label", "score"}, ...] best
        first (top_k of them, default all)}."""
        labels = labels or [str(i) for i in range(logits.shape[-1])]
        results = []
        for row in self.probabilities(logits):
            order = np.argsort(-row, kind="stable")
            ranked = [{"label": labels[j], "score": float(row[j])} for j in order[:top_k]]
            results.append(self.decode_row(row, order, ranked, labels, threshold))
        return results

    def decode_row(self, row: np.ndarray, order: np.ndarray, ranked: list[dict], labels: list[str],
                   threshold: float) -> dict:
        """One row's dict from its scores, their order (best first) and the ranked top_k."""
        return {"label": labels[order[0]], "score": float(row[order[0]]), "scores": ranked}

    def agreement(self, logits: np.ndarray, reference: np.ndarray, threshold: float = 0.5) -> float | None:
        """The share of rows where two models' outputs predict the same (an export against its source)."""
        return float(np.mean(logits.argmax(-1) == reference.argmax(-1)))

    # evaluation: batches are gathered across processes, moved to the host, then scored together

    def gather(self, accelerator, logits, labels):
        return accelerator.gather_for_metrics((logits, labels))

    def score(self, batches: list, metric_names: Sequence[str], splits, threshold: float = 0.5,
              details: dict | None = None, variety: dict | None = None) -> dict:
        """{"loss", metric: value} over (logits, labels) batches on the host; `details` filled when given, and
        `variety` with {"predicted", "true"}: how many different answers the predictions and the truth hold."""
        import torch

        from finetune.metrics import compute_metrics

        logits = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        results = {"loss": float(self.loss(logits, labels))}
        truth, predictions = self.in_units(labels.numpy(), self.predict(logits.numpy(), threshold), splits)
        results.update(compute_metrics(list(metric_names), truth, predictions))
        if details is not None:
            details.update(self.details(truth, predictions, splits.label_names))
        if variety is not None:
            variety.update(predicted=self.distinct(predictions), true=self.distinct(truth))
        return results

    def in_units(self, truth: np.ndarray, predictions: np.ndarray, splits) -> tuple[np.ndarray, np.ndarray]:
        """Truth and predictions as metrics read them."""
        return truth, predictions

    def held_out_loss(self, logits: np.ndarray, encoded: list, scaling: Callable[[], tuple | None]) -> dict:
        """{"loss": value} of a loaded model's outputs on encoded labels, as metrics.json's loss means it ({} where it
        cannot be said); `scaling()` gives the run's target standardisation, where it has one."""
        import torch

        return {"loss": float(self.loss(torch.from_numpy(logits), torch.tensor(encoded)))}

    def details(self, truth, predictions, label_names) -> dict:
        """What a table of averages hides (rows: truth, columns: prediction)."""
        return {}

    def label_text(self, value, labels: list[str]) -> str | float:
        """An encoded label as `eval --output` writes it."""
        return labels[int(value)]

    def predicted_text(self, result: dict, labels: list[str]) -> str:
        """What `decode` predicted, written as `label_text` writes the truth."""
        return result["label"]

    def record(self, result: dict, truth, labels: list[str]) -> dict:
        """`eval --output`'s fields for one row: the prediction, whether it is right, every label's score."""
        predicted = self.predicted_text(result, labels)
        scores = {item["label"]: item["score"] for item in result["scores"]}
        return {"predicted": predicted, "correct": predicted == self.label_text(truth, labels),
                **{f"score:{name}": scores[name] for name in labels}}

    # whether a run learned anything (finetune.health asks these)

    def baseline_loss(self, encoded: list, count: int) -> float | None:
        """The validation loss of a model that learned only how often each label is in training (those frequencies
        predicted for every row, the best a model blind to its inputs can do): their entropy, ln K for K balanced
        labels. `encoded`: training's labels as the splits hold them; `count`: the labels."""
        return entropy(self.label_counts(encoded, count))

    def distinct(self, values: np.ndarray) -> int | None:
        """How many different answers `values` (predictions or truth, as metrics read them) hold; None where the
        answer is a number (there the loss alone says whether the run learned)."""
        return int(len(np.unique(np.asarray(values))))

    # calibration (finetune.calibration asks these)

    def calibrates(self) -> bool:
        """True when one temperature dividing the logits can calibrate the scores (eval.calibrate)."""
        return True

    def calibration_rows(self, logits, labels):
        """(rows of logits, their labels) a temperature is fitted and scored on (torch; `loss` reads them)."""
        return logits, labels

    def reliability(self, probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(confidence, correct) per decision ECE bins: the top label's score and whether it is the truth."""
        return probabilities.max(axis=-1), probabilities.argmax(axis=-1) == labels

    def moved_threshold(self, threshold: float, temperature: float) -> float:
        """The threshold on the scores of logits / temperature that decides as `threshold` did on the raw ones."""
        return threshold

    def conformal_scores(self, probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Validation rows' nonconformity scores (split conformal): 1 - the true label's score."""
        return 1.0 - probabilities[np.arange(len(labels)), labels.astype(np.int64)]

    def confidence_set(self, result: dict, cutoff: float) -> list[str]:
        """The labels of a decoded row whose score reaches `cutoff` (1 - the conformal quantile), best first."""
        return [item["label"] for item in result["scores"] if item["score"] >= cutoff]

    # exports and the model card

    def native_config(self, labels: list[str] | None) -> dict:
        """A transformers config's fields for this head (id2label, label2id, problem_type)."""
        labels = labels or []
        return {"id2label": {str(i): name for i, name in enumerate(labels)},
                "label2id": {name: i for i, name in enumerate(labels)}, "problem_type": self.native_type}

    def labels_of_config(self, config) -> list[str] | None:
        """The label names a transformers config holds for this head."""
        return [config.id2label[i] for i in range(config.num_labels)]

    def config_fields(self, head) -> dict:
        """What the model folder must keep of the recipe's head beyond the weights (a label set's threshold)."""
        return {}

    def read_config_fields(self, kept) -> dict:
        """`config_fields` read back from a model folder's `finetune` block."""
        return {}

    def card_sentence(self, kind: str, labels: list[str], column: str) -> str:
        """The card's "it ..." clause: what the model outputs for one input of `kind` ("text", "image")."""
        return f"sorts {kind}s into one of {len(labels)} labels"

    def card_labels_note(self, head) -> str:
        """What the card's label list adds after "Labels (n)"."""
        return ""

    def card_output_note(self, head) -> str:
        """The card's line after its usage snippet: what the printed scores or values are."""
        return "\nScores are softmax probabilities over the labels.\n"

    def card_data_note(self) -> str | None:
        """The card's line under the label counts, where they count something other than one label per row."""
        return None


class SingleLabel(Problem):
    name = "single_label"
    native_type = "single_label_classification"
    default_metrics = ("accuracy", "f1_macro")
    single_class = True
    confidence_set_refusal = None

    def check_labels(self, values, where, key) -> None:
        _one_spelling(values, _present(values, where, key, "label", blank_is_missing=True), where, key)

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
        _present(values, where, key, "regression target (empty or NaN)", blank_is_missing=False)

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

    def native_config(self, labels) -> dict:
        return {"num_labels": 1, "problem_type": self.native_type}

    def labels_of_config(self, config):
        return None

    def card_sentence(self, kind, labels, column):
        return f"predicts a number (`{column}`, in the training targets' own units) from a {kind}"

    def card_output_note(self, head) -> str:
        return "\nThe output is the predicted value, in the training targets' own units.\n"


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


PROBLEMS: dict[str, Problem] = {p.name: p for p in (SingleLabel(), MultiLabel(), Regression(), Tags())}


def get(name: str) -> Problem:
    return PROBLEMS[name]
