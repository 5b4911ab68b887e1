"""The Predictor: a trained model with its preprocessing, spec and run recipe, asking its task for logits and
predictions; and reading a run folder's recipe."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import numpy as np

from finetune.errors import FinetuneError

RUN_CONFIG = "config.yaml"
PROGRESS_MIN_BATCHES = 4  # a bar for inputs that take a while; a handful of inputs print nothing extra


def read_run_recipe(run_dir: Path):
    from finetune.recipe import from_dict, parse_yaml

    path = run_dir / RUN_CONFIG
    raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(raw, dict):
        raise FinetuneError(f"{path}: not a recipe mapping; the run folder is damaged")
    return from_dict(raw, source=str(path))


class Predictor:
    """A trained model with its preprocessing: `predict(inputs)` gives label names and scores, batched.

    Unpacks as `model, preprocess, spec = finetune.load(path)` too: the eval-mode module, the tokenizer or image
    transform, and the spec (problem, labels, threshold).
    """

    model_dir: Path | None = None  # the model folder it was loaded from (its calibration.json)

    def __init__(self, model, preprocess, spec: dict, recipe=None, source: str = "", run_dir: Path | None = None,
                 device: str | None = None, model_dir: Path | None = None):
        import torch

        # nothing process-wide here (a notebook's kernel is the user's): the CLI's verbs set the allocator themselves
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval()  # moved to the device at the first prediction: unpacked, it is on the CPU as loaded
        self.preprocess = preprocess
        self.spec = spec
        self.recipe = recipe
        self.source = source
        self.run_dir = run_dir
        self.model_dir = model_dir
        from finetune.precision import for_inference

        self.precision = for_inference(run_dir, self.device)  # a bf16 run predicts under bf16 autocast where native

    def __iter__(self):
        return iter((self.model, self.preprocess, self.spec))

    def __repr__(self) -> str:
        return f"Predictor({self.source!r}, task={self.task}, problem={self.problem}, labels={self.labels})"

    @property
    def task(self) -> str:
        from finetune.tasks import task_of_library

        return self.spec.get("task") or task_of_library(self.spec.get("format"))  # a bare transformers/timm folder

    @property
    def problem(self) -> str:
        return self.spec.get("problem", "single_label")

    @property
    def labels(self) -> list[str] | None:
        return self.spec.get("labels")

    @property
    def threshold(self) -> float:
        return float(self.spec.get("threshold") or 0.5)

    @property
    def pairs(self) -> bool:
        """True for a model trained on sentence pairs (the run's data.text_pair_column): each input is two texts."""
        return self.recipe is not None and self.recipe.data.text_pair_column is not None

    @property
    def max_length(self) -> int | None:
        """Tokens per text: the run's data.max_length, else the tokenizer's (set to it at export), else the model's."""
        if self.recipe is not None:
            return self.recipe.data.max_length
        limit = getattr(self.preprocess, "model_max_length", None)
        if limit is not None and limit < 1_000_000:
            return int(limit)
        config = getattr(self.model, "config", None) or getattr(getattr(self.model, "backbone", None), "config", None)
        return getattr(config, "max_position_embeddings", None)

    # ---------------------------------------------------------------------------------------------------------------

    def logits(self, inputs: Iterable, batch_size: int = 32, progress: bool | None = None) -> np.ndarray:
        """Raw model outputs, one row per input (texts, or image paths / bytes / arrays / PIL images)."""
        inputs = list(inputs)
        if not inputs:
            return np.zeros((0, len(self.labels or [None])), dtype=np.float32)
        batches = -(-len(inputs) // batch_size)
        show = progress if progress is not None else batches >= PROGRESS_MIN_BATCHES and sys.stderr.isatty()
        from finetune.tasks import get_task

        return get_task(self.task).logits(self, inputs, batch_size, show)

    def forward(self, batch: dict) -> np.ndarray:
        """Numpy logits of one batch of model inputs (named tensors), under the run's inference precision."""
        import torch

        from finetune.precision import autocast

        self.model.to(self.device)
        with torch.inference_mode(), autocast(self.device, self.precision):
            output = self.model(**{key: value.to(self.device) for key, value in batch.items()})
        logits = output.logits if hasattr(output, "logits") else output
        return logits.float().cpu().numpy()

    def predict(self, inputs, top_k: int | None = None, batch_size: int = 32, progress: bool | None = None):
        """One dict per input; a single text, path or image gives a single dict.

        single_label: {"label", "score", "scores": [{"label", "score"}, ...] best first (top_k of them, default all)}
        multi_label: {"labels": those over the threshold, best first, "scores": [...] as above}
        regression: {"value": the prediction in the training targets' units}
        """
        from finetune.tasks import get_task

        single = isinstance(inputs, (str, Path, bytes, np.ndarray, dict)) or type(inputs).__module__.startswith("PIL.")
        results = get_task(self.task).predict(self, [inputs] if single else list(inputs), top_k, batch_size, progress)
        return results[0] if single else results

    def decode(self, logits: np.ndarray, top_k: int | None = None) -> list[dict]:
        from finetune.problems import get

        return get(self.problem).decode(logits, self.labels, self.threshold, top_k)

    def confidence_cutoff(self, level, field: str = "confidence_set") -> float:
        """The score a label needs to join a confidence set at coverage `level` (split conformal on the validation
        rows kept in the model folder's calibration.json); one FinetuneError line naming `field` where it cannot."""
        from finetune.calibration import set_cutoff

        folder = self.model_dir if self.model_dir is not None else Path(self.source)  # an ONNX export: its folder
        return set_cutoff(folder, self.problem, level, field)

    def with_confidence_sets(self, results: list[dict], cutoff: float, top_k: int | None = None) -> list[dict]:
        """Decoded rows (with every label's score) given their "confidence_set" (labels, best first; empty where no
        label is plausible enough), their scores cut to top_k afterwards."""
        from finetune.problems import get

        problem = get(self.problem)
        return [{**r, "scores": r["scores"][:top_k], "confidence_set": problem.confidence_set(r, cutoff)}
                for r in results]
