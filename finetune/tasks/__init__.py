"""Tasks: one module per task (what its inputs are and how they are read and checked, the model it builds, its
batches, its model/ folder); TASKS names them, and the loop, validate and eval ask the task, not its name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

# task name -> the module that holds it (imported when asked for: a task pulls in its own libraries)
TASKS = {
    "text-classification": "finetune.tasks.text_classification.task",
    "image-classification": "finetune.tasks.image_classification.task",
    "token-classification": "finetune.tasks.token_classification.task",
}


@dataclass
class Job:
    """What a task hands the training loop; everything after it (loop, metrics, export) is shared."""

    splits: object
    model: object  # torch.nn.Module
    datasets: dict  # split name -> torch/datasets Dataset
    make_loader: Callable  # (dataset, batch_size, training) -> DataLoader
    save: Callable  # (unwrapped model, directory) -> writes model/ without the card
    mixup: Callable | None = None  # timm Mixup for image batches
    class_weights: object = None  # single_label cross-entropy weights, in label order
    warnings: list = field(default_factory=list)  # the data report's: legal but suspicious data
    saved_names: set | None = None  # what checkpoints hold when the backbone stays frozen; None: everything
    augmenting: bool = False  # training inputs change from epoch to epoch (their features cannot be cached)
    notes: list = field(default_factory=list)  # how the task set the run up, for its log (how it loads the data)


class Task(Protocol):
    """What every task offers (the module's `TASK`)."""

    name: str
    problems: tuple[str, ...]  # the head.problem values it takes; the first is the default
    inputs: str  # "text" or "image": what a row's input is (tokenised, or decoded and transformed)
    library: str  # whose folder a native model/ is: "transformers" or "timm"
    column_key: str  # the data.* key that names a table's input column ("text_column", "image_column", ...)
    serve_input: str  # what one /predict input of `finetune serve` is: "text" (or a pair), "image", "words"

    def check_recipe(self, recipe, need) -> None:
        """The recipe keys this task constrains: need(ok, "<dotted key>: <what>; <how to fix>")."""

    def read(self, spec: str, recipe, key: str) -> dict:
        """The split(s) a data.* value (or `eval --data`) names: {"file": RawSplit} or {split name: RawSplit}."""

    def check_inputs(self, split, key: str, recipe):
        """(split, skipped): the inputs checked, unusable ones dropped or refused, as `run` treats them."""

    def load_splits(self, recipe):
        """Read, check, split and encode the recipe's data: `finetune.data.Splits`; no model needed."""

    def check_data(self, recipe):
        """`validate`: the data read and checked as `run` will, with the backbone's preprocessing but no model;
        a report with `.table()` and `.warnings`."""

    def job(self, recipe, accelerator) -> Job:
        """Data (checked and reported), model and loaders for the training loop."""

    def onnx_usage(self, info: dict) -> str:
        """The ONNX export card's ten lines: onnxruntime alone (no finetune, no torch) on example inputs, printing
        what `finetune predict` names; `info` is export.json's content."""


def get_task(name: str) -> Task:
    return importlib.import_module(TASKS[name]).TASK


def inputs_of(task: str) -> str:
    """"text" or "image" for a task name (a bare model folder's spec names its task too)."""
    return get_task(task).inputs


def onnx_text_usage(inputs: str, encode: str, decode: str) -> str:
    """The export card's lines for tokenised inputs: the exported tokenizer (the tokenizers library alone), the
    session, then `decode` (numpy on `logits`, `batch` and `inputs`)."""
    return f"""
import json, numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
info = json.load(open("export.json"))
tokenizer = Tokenizer.from_file("tokenizer.json")
tokenizer.enable_padding(); tokenizer.enable_truncation(info["max_length"] or 512)
session = ort.InferenceSession("model.onnx")
inputs = {inputs}
batch = tokenizer.encode_batch(inputs{encode})
feeds = {{"input_ids": [e.ids for e in batch], "attention_mask": [e.attention_mask for e in batch],
         "token_type_ids": [e.type_ids for e in batch]}}
logits = session.run(None, {{k: np.array(feeds[k], dtype=np.int64) for k in info["inputs"]}})[0]
{decode.strip()}
"""
