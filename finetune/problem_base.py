"""The Problem interface: what callers ask of the problem a head solves (labels, loss, decoding, scores, exports,
calibration, distillation, few labels, the audit), with the defaults of one class per row."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from finetune.errors import FinetuneError
from finetune.label_cells import (
    Where, class_name, entropy, one_spelling, present_kinds, sort_key,
)


IGNORE_INDEX = -100  # label of a position that has none (special tokens, continuation sub-tokens, padding)
NO_LABEL = "(no label)"  # the class of rows without a label or entity, when N rows per class are kept


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
        one_spelling(values, present_kinds(values, where, key, "label", blank_is_missing=False), where, key)

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

    # distillation (finetune.distill): a teacher's outputs as soft targets beside the labels

    def unlabelled(self, names: list[str] | None):
        """The placeholder label of a row without one (distill.unlabeled): no real label equals it, and the labels'
        loss leaves those rows out."""
        return IGNORE_INDEX

    def teacher_space(self, logits, splits):
        """A teacher's outputs in the space the student's logits train in (a number: standardised as its targets)."""
        return logits

    def soft_targets(self, rows: list, labels):
        """One batch's teacher outputs (an array per row, from the per-row cache) as a tensor like the logits."""
        from finetune.soft_targets import stacked

        return stacked(rows, labels.device)

    def soft_loss(self, logits, teacher, labels, temperature: float):
        """The distillation loss against the teacher's outputs: T^2 * KL of the softmaxes at T, averaged over rows."""
        from finetune.soft_targets import softmax_kl

        return softmax_kl(logits, teacher, temperature)

    # few labels: what a row counts for when N rows per class are kept, how alike two rows' labels are (contrastive)

    def few_label_refusal(self) -> str | None:
        """Why rows cannot be counted per class nor paired by label (data.*_per_class, contrastive); None: they can."""
        return None

    def row_classes(self, value: Any) -> list[str]:
        """The classes one label cell counts for when N rows per class are kept (data.train_per_class)."""
        return self.names_in(value)

    def label_similarity(self, a, b):
        """How alike encoded labels are, a (len(a), len(b)) tensor in [0, 1]: a contrastive pair's target and
        SupCon's positive weight; 0 is a pair of different classes."""
        raise FinetuneError(f"contrastive: head.problem={self.name} has no labels to pair rows by")

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

    # the label audit (finetune.audit): cleanlab's confident learning on out-of-sample outputs

    audit_refusal: str | None = None  # why `finetune audit` cannot judge this problem's labels; None: it can

    def label_issues(self, outputs: list, labels: list, threshold: float = 0.5) -> tuple[list[tuple], Any]:
        """cleanlab on out-of-sample logits and encoded labels (one item per row): ([(row, word or None, given,
        suggested, label quality)] for the flagged rows, cleanlab's per-class table of issues and noise)."""
        from finetune.confident_learning import single_label_issues

        return single_label_issues(self.probabilities(np.stack(outputs)), np.asarray(labels, dtype=np.int64))
