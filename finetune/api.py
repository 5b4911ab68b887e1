"""The Python API: run, validate, evaluate, load and export, the functions the CLI's verbs are a thin layer over."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

RUN_CONFIG, RUN_METRICS = "config.yaml", "metrics.json"
OVERRIDES_HELP = "a dict of dotted keys ({'train.lr': 3e-5}) or a list of 'key=value' strings (['train.lr=3e-5'])"


@dataclass
class Run:
    """A finished training run: `dir` (the run folder), `metrics` (metrics.json's content) and `recipe` (the resolved
    recipe it trained with, a finetune.recipe.Recipe)."""

    dir: Path
    metrics: dict
    recipe: Any

    def load(self, device: str | None = None):
        """The run's model ready to predict: what `finetune.load(run.dir)` gives."""
        return load(self.dir, device=device)

    def __repr__(self) -> str:
        test = self.metrics.get("test") or {}
        scores = ", ".join(f"{name} {value:.4f}" for name, value in test.items() if isinstance(value, (int, float)))
        return f"Run({str(self.dir)!r}{', test: ' + scores if scores else ''})"


class Evaluation(dict):
    """The metrics of an evaluation, named as in metrics.json ({"loss": ..., "accuracy": ...}); `report` holds all of
    what `finetune eval --json` prints: the metrics, rows, data, model and the problem's details (confusion matrix,
    per-label scores)."""

    def __init__(self, report: dict):
        super().__init__(report["metrics"])
        self.report = report


def resolve_recipe(recipe, overrides=None, output_dir: str | os.PathLike | None = None):
    """The recipe checked, with its defaults filled in: what `finetune validate` prints and `run` trains with.

    recipe: a recipe file, a built-in recipe's name (`finetune ls` lists them), a run folder (its config.yaml), a dict
    shaped like a recipe file, or an already resolved Recipe. overrides: a dict of dotted keys or a list of
    `key=value` strings, as `finetune run` takes them. output_dir: output.dir, after the overrides. A recipe without
    output.dir writes to runs/<the file's name> (runs/recipe for a dict).
    """
    from finetune.recipe import Recipe, from_dict, to_dict

    if isinstance(recipe, Recipe) and overrides is None and output_dir is None:
        return recipe
    raw, source, stem = _raw_recipe(to_dict(recipe) if isinstance(recipe, Recipe) else recipe)
    raw = _with_overrides(raw, overrides)
    if output_dir is not None:
        raw = _with_overrides(raw, {"output.dir": str(output_dir)})
    resolved = from_dict(raw, source=source)
    if resolved.output.dir is None:
        resolved.output.dir = str(Path("runs") / stem)
    return resolved


def _raw_recipe(recipe) -> tuple[dict, str, str]:
    """(the recipe's mapping, its name in error messages, its name for the default run folder)."""
    from finetune.recipe import find_recipe, read_recipe_file

    if isinstance(recipe, Mapping):
        return _as_written(recipe), "recipe", "recipe"
    if not isinstance(recipe, (str, os.PathLike)):
        raise FinetuneError(f"recipe: expected a recipe file, a built-in recipe name or a dict, got "
                            f"{type(recipe).__name__}")
    path = Path(recipe)
    if path.is_dir() and (path / RUN_CONFIG).is_file():  # a run folder: its own resolved recipe
        path = path / RUN_CONFIG
    path = find_recipe(str(path))
    return read_recipe_file(path), str(path), path.stem


def _with_overrides(raw: dict, overrides) -> dict:
    """The overrides applied: `key=value` strings parse as `finetune run`'s do; a dict's values are taken as given."""
    from finetune.recipe import apply_overrides

    if overrides is None:
        return raw
    if isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(overrides, (Mapping, list, tuple)):
        raise FinetuneError(f"overrides: expected {OVERRIDES_HELP}, got {type(overrides).__name__}")
    if not isinstance(overrides, Mapping):
        return apply_overrides(raw, [str(item) for item in overrides])
    for key, value in overrides.items():
        parts = str(key).split(".")
        if not all(parts):
            raise FinetuneError(f"overrides: '{key}' is not a dotted key such as train.lr; expected {OVERRIDES_HELP}")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _as_written(value)
    return raw


def _as_written(value):
    """A copy as a recipe file would hold it: paths as strings, tuples as lists."""
    if isinstance(value, Mapping):
        return {key: _as_written(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_written(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return copy.deepcopy(value)


def run(recipe, overrides=None, output_dir: str | os.PathLike | None = None, resume: bool = False,
        overwrite: bool = False) -> Run:
    """Train as the recipe says and write the run folder, as `finetune run` does; returns the finished Run.

    recipe and overrides: as resolve_recipe takes them (a file, a built-in name, a run folder or a dict; a dict of
    dotted keys or a list of `key=value` strings). output_dir replaces output.dir. resume: continue the unfinished
    run in output.dir from its last checkpoint. overwrite: replace an existing run folder (else it is refused).

    The one global change the API makes: on a machine without an accelerator, training sets glibc's malloc to keep
    freed memory for the next step (finetune.allocator; process-wide, for the rest of the process, a notebook's
    kernel included). Importing finetune, load, evaluate, validate and export change nothing global.
    """
    resolved = resolve_recipe(recipe, overrides, output_dir)
    from finetune.train import train

    metrics = train(resolved, overwrite=overwrite, resume=resume)
    out = Path(resolved.output.dir)
    written = out / RUN_METRICS
    if written.is_file():  # JSON's own types, as a reader of the run folder sees them
        metrics = json.loads(written.read_text(encoding="utf-8"))
    return Run(out, metrics, resolved)


def validate(recipe, overrides=None):
    """Check a recipe and its data without training, as `finetune validate` does; returns the data report.

    The report (finetune.checks.DataReport) holds task, problem, labels, splits (per split: source, rows, label
    counts or target statistics, skipped rows, rows also in train, token lengths), max_length and warnings;
    `report.table()` is the text `validate` prints and `dataclasses.asdict(report)` a plain dict. Bad input raises
    FinetuneError naming the file, column or key.
    """
    resolved = resolve_recipe(recipe, overrides)
    from finetune.checks import check_data
    from finetune.optim import check_scheduler
    from finetune.tracking import check_trackers

    check_trackers(resolved.train.log_with)
    check_scheduler(resolved.train.scheduler, resolved.train.scheduler_args)
    # files, columns, labels, leakage, token lengths, backbone, output folder: what `run` checks, without a model
    return check_data(resolved)


def evaluate(model, data: str | os.PathLike, *, split: str = "test", text_column: str | None = None,
             label_column: str | None = None, image_column: str | None = None, pair_column: str | None = None,
             batch_size: int = 32, output: str | os.PathLike | None = None, progress: bool | None = None) -> Evaluation:
    """A trained model's metrics on labelled data, as `finetune eval` computes them; returns the metrics as a dict.

    model: a Run, a run folder, its model/ folder, a hub model id, an ONNX export folder or a loaded model (what
    finetune.load returns). data: labelled data in any form `run` reads (a file, a folder, a zoo or hub: name; split
    picks one of its splits). The columns default to the run's own (data.text_column, ...). output: per-row
    predictions written to a .csv or .jsonl file. The returned dict's `report` holds the rest (rows, confusion
    matrix, per-label scores).
    """
    from finetune.evaluation import evaluate_model

    report = evaluate_model(_model_source(model), os.fspath(data), split=split, text_column=text_column,
                            label_column=label_column, image_column=image_column, batch_size=batch_size,
                            output=None if output is None else os.fspath(output), progress=progress,
                            pair_column=pair_column)
    return Evaluation(report)


def load(source, device: str | None = None):
    """A trained model ready to use, from a Run, a run folder, its `model/` folder, a hub model id (owner/name) or an
    ONNX export folder.

    `finetune.load(path).predict(["a text"])` gives label names and scores (a number for regression), batched; the
    object also unpacks as `model, preprocess, spec` (the eval-mode module, the tokenizer or timm eval transform, and
    the labels and problem) for use in your own loop. Loading changes nothing in the process beyond the model itself
    (no allocator setting: that is `run`'s, and the CLI's, whose process it is).
    """
    from finetune.loading import load_predictor

    return load_predictor(_model_source(source), device=device)


def export(model, format: str = "onnx", quantize: str | None = None,
           output: str | os.PathLike | None = None) -> Path:
    """An ONNX folder (model.onnx with its tokenizer or preprocessing, labels, a card and export.json) that
    onnxruntime serves alone, as `finetune export` writes it; returns the folder.

    model: a Run, a run folder, its model/ folder or a loaded model (what finetune.load returns). quantize: None
    (fp32) or "int8". output: default <run>/export/onnx[-int8]/. export.json holds the parity with the torch model,
    measured before this returns (a mismatch raises FinetuneError).
    """
    if format != "onnx":
        raise FinetuneError(f"format: '{format}' is not supported; use onnx")
    from finetune.onnx_export import export_onnx

    source = _model_source(model)
    if not isinstance(source, (str, os.PathLike)):  # a loaded model: export the folder it was loaded from
        source = source.run_dir or source.source
    info = export_onnx(source, output=output, quantize=quantize)
    return Path(info["path"])


def _model_source(model):
    """What the model-taking functions take: a Run's folder, a path as a string, a loaded model as it is."""
    if isinstance(model, Run):
        return str(model.dir)
    if isinstance(model, os.PathLike):
        return os.fspath(model)
    return model
