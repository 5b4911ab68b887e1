"""`finetune eval`: a trained model's metrics on any labelled file, with metrics.json's names, and per-row output."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from finetune.errors import FinetuneError
from finetune.loading import load_predictor
from finetune.predictor import Predictor

OUTPUT_FORMATS = (".csv", ".jsonl")


def eval_recipe(predictor: Predictor, data: str, text_column=None, label_column=None, image_column=None,
                pair_column=None):
    """The recipe that reads `data` as the run read its own: the run's columns, problem and threshold, else the
    model's spec with the given (or default) column names."""
    from finetune.recipe import from_dict, to_dict

    if predictor.recipe is not None:
        raw = to_dict(predictor.recipe)
        raw["data"].update(train=data, validation=None, test=None, max_samples=None)
    else:
        raw = {
            "task": predictor.task,
            "backbone": {"name": predictor.source},
            "head": {"problem": predictor.problem, "threshold": predictor.threshold},
            "data": {"train": data},
        }
    options = (("text_column", text_column), ("label_column", label_column), ("image_column", image_column),
               ("text_pair_column", pair_column))
    for key, value in options:
        if value is not None:
            raw["data"][key] = value
    raw["lora"] = None  # the model is already trained: only the data and head keys matter here
    return from_dict(raw, source="eval")


def read_labelled(recipe, data: str, split: str):
    """The RawSplit to evaluate on: a file or folder, or one split of a zoo/hub data set or of a split folder."""
    from finetune.tasks import get_task

    try:
        parts = get_task(recipe.task).read(data, recipe, "--data")
    except FinetuneError as error:  # the readers name recipe keys; here the user sets them as options
        raise FinetuneError(_as_options(str(error))) from None
    if "file" in parts:
        return parts["file"]
    if split not in parts:
        raise FinetuneError(f"--data: '{data}' has no split '{split}' (it has: {', '.join(parts)}); pass --split")
    return parts[split]


def _as_options(message: str) -> str:
    for key in ("text_pair_column", "text_column", "label_column", "image_column"):
        option = "--pair-column" if key == "text_pair_column" else "--" + key.replace("_", "-")
        message = message.replace(f"data.{key}=", f"{option} ").replace(f"data.{key}", option)
    return message


def _target_scaling(predictor: Predictor) -> tuple[float, float] | None:
    """The run's target standardisation (split.json), so a regression loss means what metrics.json's does."""
    if predictor.run_dir is None or not (predictor.run_dir / "split.json").is_file():
        return None
    target = json.loads((predictor.run_dir / "split.json").read_text()).get("target")
    return (float(target["mean"]), float(target["std"])) if target else None


def evaluate_model(source, data: str, split: str = "test", text_column=None, label_column=None, image_column=None,
                   batch_size: int = 32, output: str | None = None, progress: bool | None = None,
                   pair_column: str | None = None) -> dict:
    """{"metrics": {loss, metric: value}, "rows": n, "data": ..., "confusion"/"per_label"/...: ...} for the model
    (`source`: what load_predictor takes, or a Predictor already loaded)."""
    from finetune.tasks import get_task

    if output is not None and Path(output).suffix.lower() not in OUTPUT_FORMATS:
        raise FinetuneError(f"--output: '{output}' must end in {' or '.join(OUTPUT_FORMATS)}")
    predictor = source if isinstance(source, Predictor) else load_predictor(source)
    recipe = eval_recipe(predictor, data, text_column, label_column, image_column, pair_column)
    raw = read_labelled(recipe, data, split)
    report = get_task(recipe.task).evaluate(predictor, raw, recipe, split, batch_size, progress,
                                            records=output is not None)
    records, details = report.pop("records"), report.pop("details")
    report.update(data=data, model=predictor.source, **details)
    if output is not None:
        write_records(Path(output), records)
    return report


def evaluate_rows(predictor: Predictor, raw, recipe, split: str = "test", batch_size: int = 32,
                  progress: bool | None = None, records: bool = False) -> dict:
    """`Task.evaluate` for one row of logits per input: the split's labels and inputs checked as `run` checks
    them, the run's loss and metrics, the problem's details (confusion matrix, per-label F1), and a record per row."""
    from finetune.data import check_labels, encode_labels
    from finetune.metrics import compute_metrics
    from finetune.problems import get
    from finetune.tasks import get_task

    problem = get(predictor.problem)
    check_labels(raw, "--data", predictor.problem)
    raw = get_task(recipe.task).check_eval_inputs(raw, recipe)
    truth = encode_labels(raw, predictor.problem, predictor.labels, "--data")
    inputs = raw.texts if raw.pairs is None else [{"text": a, "text_pair": b} for a, b in zip(raw.texts, raw.pairs)]
    logits = predictor.logits(inputs, batch_size, progress)
    predictions = problem.predict(logits, predictor.threshold)

    results = problem.held_out_loss(logits, truth, lambda: _target_scaling(predictor))
    truth = problem.truth_array(truth)
    results.update(compute_metrics(recipe.eval.metrics, truth, predictions))  # the run's, else the problem's defaults
    found = problem.details(truth, predictions, predictor.labels)
    details = {name: {"split": split, **value} for name, value in found.items()}
    rows = prediction_records(predictor, raw, truth, logits) if records else []
    return {"metrics": results, "rows": len(truth), "details": details, "records": rows}


def prediction_records(predictor: Predictor, raw, truth, logits: np.ndarray) -> list[dict]:
    """One record per row: where it came from, the input, the true and predicted labels, and every label's score."""
    from finetune.problems import get

    problem, labels = get(predictor.problem), predictor.labels
    decoded = predictor.decode(logits)
    records = []
    for i, (entry, row) in enumerate(zip(raw.texts, raw.rows)):
        shown = entry if isinstance(entry, str) else None  # image bytes or arrays are not written out
        record = {"row": row, "input": shown, "label": problem.label_text(truth[i], labels)}
        if raw.pairs is not None:
            record = {"row": row, "input": shown, "input_pair": raw.pairs[i], "label": record["label"]}
        record.update(problem.record(decoded[i], truth[i], labels))
        records.append(record)
    return records


def write_records(path: Path, records: list[dict]) -> None:
    """--output: one record per row, as JSON lines (.jsonl) or a CSV table."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as file:
            if path.suffix.lower() == ".jsonl":
                for record in records:
                    file.write(json.dumps(_finite(record), ensure_ascii=False) + "\n")
            else:
                writer = csv.DictWriter(file, fieldnames=list(records[0]) if records else ["row"])
                writer.writeheader()
                writer.writerows(records)
    except OSError as error:
        raise FinetuneError(f"--output: cannot write '{path}' ({error.strerror or error})") from None


def _finite(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
