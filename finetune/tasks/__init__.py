"""Tasks: the `Task` interface every caller asks, `Job` (what a task hands the loop), and TASKS, the table naming
each task's folder (`finetune/tasks/<task>/`: its readers, inputs, model folder and report)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    # distill.unlabeled: (training rows, inputs as read_inputs gives them, placeholder label) -> (the rows with the
    # inputs after them, the inputs' table as `Task.teacher_outputs` reads it); None: the task takes none
    add_unlabeled: Callable | None = None
    distiller: object = None  # distill: the teacher and the loss that mixes its outputs in (finetune.distill)
    record: dict = field(default_factory=dict)  # what the set-up adds to metrics.json (kept layers, the teacher)


class Task:
    """What every task offers (its folder's `task.TASK`): callers (loop, train, validate, predict, eval, serve, sweep,
    export, onnx_export, onnx_runtime, checks, runs, needs) ask these methods and never a task's name.

    The defaults here serve the common case, one row of logits per input, where that needs no kit module. The
    row-of-logits defaults that score with the kit's metrics live in `finetune.tasks.rows.RowTask`: this module
    imports nothing of the kit, because `finetune.problems` reads the token task's tag functions from this package.
    """

    name: str
    problems: tuple[str, ...]  # the head.problem values it takes; the first is the default
    inputs: str  # what one input is, in the card's words: "text" or "image"
    library: str  # whose folder a native model/ is: "transformers" or "timm"
    column_key: str  # the data.* key that names a table's input column ("text_column", "image_column", ...)
    step_choice_applies: bool = False  # a CPU run measures its memory format and precision (`step_choice`)
    contrastive_applies: bool = False  # `contrastive:` tunes its backbone on pairs of labelled inputs first
    # what `finetune predict RUN ...` takes, as the end of a run suggests it (shell-quoted)
    predict_example: str = '"a text to classify"'

    # -- data ------------------------------------------------------------------------------------------------------

    def check_recipe(self, recipe, need) -> None:
        """The recipe keys this task constrains: need(ok, "<dotted key>: <what>; <how to fix>")."""

    def read(self, spec: str, recipe, key: str) -> dict:
        """The split(s) a data.* value (or `eval --data`) names: {"file": RawSplit} or {split name: RawSplit}."""
        raise NotImplementedError

    def check_eval_inputs(self, raw, recipe):
        """`eval --data`'s split with its inputs checked as `run` checks them (unusable ones dropped or refused)."""
        return raw

    def load_splits(self, recipe):
        """Read, check, split and encode the recipe's data: `finetune.data.Splits`; no model needed."""
        raise NotImplementedError

    def check_data(self, recipe):
        """`validate`: the data read and checked as `run` will, with the backbone's preprocessing but no model;
        a report with `.table()` and `.warnings`."""
        raise NotImplementedError

    def job(self, recipe, accelerator) -> Job:
        """Data (checked and reported), model and loaders for the training loop."""
        raise NotImplementedError

    def step_choice(self, recipe, native_bf16: bool):
        """A CPU run's measured memory format and precision (`finetune.step_choice.StepChoice`), or None: nothing
        to measure. Asked only where `step_choice_applies`."""
        return None

    # -- distillation (finetune.distill) ----------------------------------------------------------------------------

    def teacher_outputs(self, teacher, table: dict) -> list | None:
        """A teacher's (a Predictor's) outputs for each row of a split's table, computed once for a run: a row of
        logits per input; None where inputs change between epochs, so the teacher runs on each training batch."""
        return None

    def teacher_on_batch(self, teacher, batch: dict, student):
        """The teacher's outputs on a training batch exactly as the student (its model as built) sees it."""
        return teacher.model(**batch)

    # -- the model folder -------------------------------------------------------------------------------------------

    def owns_model_folder(self, directory: Path) -> bool:
        """True when `directory` (a `model/` folder: transformers', timm's or finetune's format) holds this task's
        model, as its own save wrote it; `task_of_model_folder` asks each task in TASKS order."""
        return False

    def load_model_folder(self, directory: Path) -> tuple:
        """(model in eval mode, its preprocessing: tokenizer or image transform, spec) from a folder this task owns;
        spec: {"format", "problem", "labels", ...} as finetune.json holds it. Weights come from safetensors only."""
        raise NotImplementedError

    # -- inputs for predict and serve ------------------------------------------------------------------------------

    def read_inputs(self, items: list[str], column: str, pair_column: str | None = None) -> list[tuple[str, Any]]:
        """(what to show, what to predict on) for each input `finetune predict` names: raw strings, files, folders
        and table columns (`column`; `pair_column` for sentence pairs), as this task's inputs."""
        raise NotImplementedError

    def parse_input(self, value, position: int) -> tuple[str, Any]:
        """(what to show, what to predict on) for one JSON input of `finetune serve`'s /predict (a string, a
        {"text", "text_pair"} object, a list of words, a base64 image); FinetuneError naming `inputs[position]`."""
        raise NotImplementedError

    # -- predicting and evaluating ---------------------------------------------------------------------------------

    def logits(self, predictor, inputs: list, batch_size: int, show: bool):
        """The model's raw outputs on inputs, batched (`predictor.forward` runs a batch): numpy, one row per input
        for row-of-logits tasks; `show` draws a progress bar."""
        raise NotImplementedError

    def predict(self, predictor, inputs: list, top_k: int | None = None, batch_size: int = 32,
                progress: bool | None = None) -> list[dict]:
        """One dict per input, as `finetune predict --json` prints it: the row of logits decoded by the problem."""
        return predictor.decode(predictor.logits(inputs, batch_size, progress), top_k)

    def evaluate(self, predictor, raw, recipe, split: str = "test", batch_size: int = 32,
                 progress: bool | None = None, records: bool = False) -> dict:
        """`finetune eval` on a checked split: {"metrics", "rows", "details": {name: {..., "split"}}, "records":
        one dict per row for --output, built only when `records` asks (else empty)}."""
        raise NotImplementedError

    def batch_outputs(self, predictor, inputs: list, batch_size: int) -> list:
        """What `serve` computes for one micro-batch of several requests' inputs, one item per input; each request's
        slice then goes through `decode_outputs` with its own top_k. Default: rows of logits."""
        return predictor.logits(inputs, batch_size, False)

    def decode_outputs(self, predictor, outputs, top_k: int | None) -> list[dict]:
        """One request's slice of `batch_outputs` as `predict --json` prints it. Default: the problem decodes."""
        return predictor.decode(outputs, top_k)

    # -- timing against the native library (finetune shrink) --------------------------------------------------------

    def timing_inputs(self, raw) -> list:
        """A checked split's inputs as predict takes them (and `native_runner`'s runner), to time models alike."""
        return list(raw.texts)

    def native_runner(self, folder: Path, max_length: int | None):
        """run(inputs, batch_size) calling a `model/` folder as its own library serves it, with no finetune code
        (transformers.pipeline, timm): the baseline the kit's exports are timed against."""
        from finetune.errors import FinetuneError

        raise FinetuneError(f"{self.name}: no native runner to time its models with")

    # -- explanations ----------------------------------------------------------------------------------------------

    def explainable(self, predictor):
        """What `finetune explain` attributes through (`finetune.tasks.explaining.Explainable`): the inputs as rows
        with baselines and targets, the layer gradients enter, and how attributions fold into words or pixels."""
        from finetune.errors import FinetuneError

        raise FinetuneError(f"explain: {self.name} models have no explanations yet")

    # -- the model card --------------------------------------------------------------------------------------------

    def card_usage(self, recipe, reference: str, native: bool) -> str:
        """The card's "Use" section: loading the model folder (`reference`) and predicting on an example input."""
        raise NotImplementedError

    def card_input_limits(self, recipe) -> str:
        """The card's limit line on how an input is cut or resized before the model sees it."""
        raise NotImplementedError

    def card_tags(self, native: bool) -> list[str]:
        """Hub tags beyond the task and problem (a timm backbone in the kit's own format is still tagged timm)."""
        return []

    def model_reference(self, folder: str, native: bool) -> str:
        """What the card's usage passes to the loader for the model folder."""
        return folder

    def base_model(self, name: str) -> str | None:
        """The hub id of a pretrained backbone name (not a zoo name), or None for a local folder."""
        if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
            return None
        return name  # a hub id

    # -- ONNX ------------------------------------------------------------------------------------------------------

    def onnx_usage(self, info: dict) -> str:
        """The ONNX export card's ten lines: onnxruntime alone (no finetune, no torch) on example inputs, printing
        what `finetune predict` names; `info` is export.json's content."""
        raise NotImplementedError

    def onnx_image_graph(self) -> bool:
        """True when the exported graph takes `pixel_values` (exported through timm, int8 calibrated on images, no
        transformer fusion); False for tokenised inputs."""
        return False

    def onnx_preprocess(self, folder: Path, info: dict):
        """An export folder's preprocessing, for predict/eval/serve on it: the exported tokenizer by default."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        if info.get("max_length"):
            tokenizer.model_max_length = int(info["max_length"])
        return tokenizer

    def parity_logits(self, predictor, sample: list):
        """The logits the export's parity check compares between torch and ONNX on `sample`."""
        return predictor.logits(sample)

    # -- runs and recipes ------------------------------------------------------------------------------------------

    def settings_note(self, data: dict) -> str | None:
        """`finetune ls RUNS`' note on the input size, from a config's data section ("len 128", "224px")."""
        return f"len {data['max_length']}" if data.get("max_length") else None

    def backbone_offline(self, backbone: dict) -> bool:
        """True when the (unvalidated) backbone section builds its model with no download beyond the zoo."""
        return False

    def zoo_data(self) -> tuple[str, ...]:
        """The data set names this task reads from its offline zoo (a data key naming anything else is a file, a
        folder or hub:<id>)."""
        return ()

    # -- the learning curve ----------------------------------------------------------------------------------------

    def baseline_features(self, recipe):
        """`finetune curve`'s classical baseline: a scikit-learn transformer from a split's table (its dict of
        columns, as load_splits gives it) to a feature matrix for a logistic regression; None: this task has no
        classical baseline (curve refuses the `baseline` method)."""
        return None

    # -- the label audit -------------------------------------------------------------------------------------------

    def write_without(self, spec: str, recipe, dropped: set, output: Path) -> tuple[int, str]:
        """`audit --clean`: a copy of the data file `spec` (data.train's value) without the rows whose RawSplit.rows
        value is in `dropped`, in the file's own format; (rows kept, what was written). Default: a table file."""
        from finetune.tasks.row_files import data_file, write_table_without

        return write_table_without(data_file(spec, "data.train"), dropped, output), str(output)


def get_task(name: str) -> Task:
    return importlib.import_module(TASKS[name]).TASK


def task_of_library(library: str) -> str:
    """The first task whose native folders `library` writes (else the first task): what a model folder whose spec
    names no task holds."""
    return next((name for name in TASKS if get_task(name).library == library), next(iter(TASKS)))


def task_of_model_folder(directory: Path) -> Task:
    """The first task (in TASKS order) that owns the model folder; else the first task, which loads any other
    transformers folder (a bare backbone, a hub model) as it always has."""
    tasks = [get_task(name) for name in TASKS]
    return next((task for task in tasks if task.owns_model_folder(directory)), tasks[0])
