"""What a task hands `finetune explain`: its inputs as attributable rows (`Subject`), what to explain in each
(`Target`), where gradients enter (the embedding or convolutional layer) and how attributions fold back into words
or pixels (`Explainable`); the text version that text and token classification share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from finetune.errors import FinetuneError


@dataclass
class Target:
    """One output to explain: its label, the model's score for it, the output's index and, for per-token outputs,
    the position whose row it reads (None: one row per input)."""

    label: str
    score: float
    index: int
    position: int | None = None
    about: dict = field(default_factory=dict)  # what the JSON says of it beside the attributions (an entity's span)


@dataclass
class Subject:
    """One input made attributable: its model inputs (one row, no batch axis), the baseline of the attributed
    tensor, what to explain, and how the attributed tensor's positions map to units (words; None for pixels)."""

    shown: str
    entry: object  # what predict takes for it (a text, a pair, an image)
    row: dict  # key -> tensor without the batch axis
    baseline: object  # tensor shaped as row[key]
    targets: list[Target]
    unit_index: object = None  # LongTensor over positions: the word each sub-token belongs to, -1 for none
    units: list[dict] = field(default_factory=list)  # {"word", "start", "end", "part"} per word
    picture: object = None  # uint8 HxWx3: what an image model saw, for the overlay


def score_transform(problem: str):
    """Scores as the problem reads logits, in torch (so gradients flow): sigmoid for multi-label, the value itself for
    regression, softmax over the last axis otherwise."""
    import torch

    if problem == "multi_label":
        return torch.sigmoid
    if problem == "regression":
        return lambda logits: logits
    return lambda logits: torch.softmax(logits, dim=-1)


def torch_model_of(predictor):
    """The predictor's torch module, or None for an ONNX session (no gradients there)."""
    import torch

    return predictor.model if isinstance(predictor.model, torch.nn.Module) else None


class Explainable:
    """A task's side of explanations; `finetune.explain` runs the methods on top of it and never asks a task's name.

    key: the model input attributions are made on. ig_layer: where Integrated Gradients interpolates (the word
    embeddings; None: the input tensor itself). gradcam_layer: Grad-CAM's layer, or None where the model has none.
    pad_values: what pads each input key when rows of different lengths share a batch (0 where unnamed).
    forward_budget: how many elements of the attributed input one forward and backward pass takes (memory).
    """

    key = "input_ids"
    kind = "text"  # the input kind, in messages
    ig_layer = None
    gradcam_layer = None
    pad_values: dict = {}
    forward_budget = 128 * 64  # input elements per forward and backward pass: 128 texts of 64 tokens

    def __init__(self, predictor):
        self.predictor = predictor
        self.model = torch_model_of(predictor)
        self.transform = score_transform(predictor.problem)

    def methods(self) -> tuple[str, ...]:
        """The methods that apply, the default first."""
        if self.model is None:
            return ("occlusion",)
        return ("integrated-gradients", "occlusion") + (("gradcam",) if self.gradcam_layer is not None else ())

    def subjects(self, entries: list, label: str | None) -> list[Subject]:
        raise NotImplementedError

    def score(self, logits, index, position):
        """The target's score per row of a batch of logits ([rows, outputs], or [rows, positions, outputs])."""
        import torch

        scores = self.transform(logits.float())
        if scores.dim() == 3:
            scores = scores[torch.arange(len(scores)), position]
        return scores.gather(1, index[:, None]).squeeze(1)

    def feature_mask(self, unit_index):
        """captum's feature groups for occlusion: one per word (the positions of no word share the last group);
        None: slide windows over the input instead (pixels)."""
        if unit_index is None:
            return None
        groups = unit_index.clone()
        groups[groups < 0] = int(unit_index.max()) + 1
        return groups

    def reduce(self, subject: Subject, attribution, additive: bool) -> np.ndarray:
        """One row's attributions folded into its units: summed into words where attributions add up (gradients),
        averaged where each position carries its group's value (occlusion)."""
        import torch

        values = attribution.detach().float()
        values = values.reshape(values.shape[0], -1).sum(1)[: len(subject.unit_index)]
        index = subject.unit_index
        kept = index >= 0
        count = len(subject.units)
        total = torch.zeros(count).index_add_(0, index[kept], values[kept])
        if not additive:
            total /= torch.zeros(count).index_add_(0, index[kept], torch.ones(int(kept.sum()))).clamp(min=1)
        return total.numpy()

    def describe(self, subject: Subject, explained: list[tuple[Target, np.ndarray]]) -> dict:
        """The --json object of one input."""
        raise NotImplementedError

    def erase(self, subject: Subject, keep: np.ndarray):
        """The input with only the units `keep` marks (faithfulness); what predict takes."""
        raise FinetuneError(f"--faithfulness: removing words applies to text models, not {self.kind} models")


def word_list(subject: Subject, values: np.ndarray, part: int) -> list[dict]:
    """The --json "words" of one text of the input (part 0; 1: the pair's second text)."""
    return [{"word": unit["word"], "start": unit["start"], "end": unit["end"], "attribution": float(value)}
            for unit, value in zip(subject.units, values) if unit["part"] == part]


class TextExplainable(Explainable):
    """Texts and sentence pairs through a fast tokenizer: Integrated Gradients on the word embeddings with a baseline
    of pad tokens (the special tokens kept), sub-tokens summed into the tokenizer's words."""

    def __init__(self, predictor):
        super().__init__(predictor)
        from finetune.model import interface_of

        tokenizer = predictor.preprocess
        if not getattr(tokenizer, "is_fast", False):
            raise FinetuneError(f"{predictor.source}: explanations need a fast tokenizer (word offsets); "
                                "save the model with a tokenizer.json")
        self.tokenizer = tokenizer
        self.pad_values = {"input_ids": tokenizer.pad_token_id or 0}
        self.ig_layer = interface_of(self.model).word_embeddings() if self.model is not None else None

    def encode(self, entry) -> Subject:
        """A text or pair as one row of tensors, with its words and the word of each sub-token."""
        import torch

        first, second = (entry["text"], entry["text_pair"]) if isinstance(entry, dict) else (entry, None)
        encoding = self.tokenizer(first, second, truncation="longest_first", max_length=self.predictor.max_length,
                                  return_tensors="pt")
        row = {key: value[0] for key, value in encoding.items()}
        words, sequences = encoding.word_ids(0), encoding.sequence_ids(0)
        units, index, seen = [], [], {}
        for position, (word, part) in enumerate(zip(words, sequences)):
            if word is None:
                index.append(-1)
                continue
            text = first if part == 0 else second
            if (part, word) not in seen:
                start, end = encoding.word_to_chars(0, word, sequence_index=part)
                seen[(part, word)] = len(units)
                units.append({"word": text[start:end], "start": start, "end": end, "part": part})
            index.append(seen[(part, word)])
        unit_index = torch.tensor(index)
        baseline = row["input_ids"].clone()
        baseline[unit_index >= 0] = self.pad_values["input_ids"]  # [CLS]/[SEP] stay: only the words are removed
        shown = first if second is None else f"{first} | {second}"
        return Subject(shown, entry, row, baseline, [], unit_index, units)

    def logits_of(self, subject: Subject):
        import torch

        batch = {key: value[None] for key, value in subject.row.items()}
        return torch.from_numpy(np.asarray(self.predictor.forward(batch)))

    def subjects(self, entries: list, label: str | None) -> list[Subject]:
        subjects = []
        for entry in entries:
            subject = self.encode(entry)
            subject.targets = [row_target(self.predictor, self.logits_of(subject)[0], label, self.transform)]
            subjects.append(subject)
        return subjects

    def describe(self, subject: Subject, explained: list[tuple[Target, np.ndarray]]) -> dict:
        target, values = explained[0]
        result = {"label": target.label, "score": target.score, "words": word_list(subject, values, 0)}
        if any(unit["part"] == 1 for unit in subject.units):
            result["pair_words"] = word_list(subject, values, 1)
        return result

    def erase(self, subject: Subject, keep: np.ndarray):
        parts = []
        for part in (0, 1):
            kept = [unit["word"] for unit, k in zip(subject.units, keep) if k and unit["part"] == part]
            parts.append(" ".join(kept))
        if any(unit["part"] == 1 for unit in subject.units):
            return (parts[0], parts[1])
        return parts[0]


def row_target(predictor, logits, label: str | None, transform) -> Target:
    """The label to explain in one row of logits: `label` when given, else the best-scoring one."""
    scores = transform(logits.float()[None])[0]
    names = predictor.labels or [str(i) for i in range(len(scores))]
    if label is None:
        index = int(scores.argmax())
    elif label in names:
        index = names.index(label)
    else:
        raise FinetuneError(f"--label {label}: not one of the model's labels ({', '.join(names)})")
    return Target(names[index], float(scores[index]), index)
