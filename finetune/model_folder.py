"""Export: the `model/` folder (ecosystem format when native), its plots and its model card."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np

from finetune import __version__, calibration, contrastive
from finetune import recipe as recipe_module
from finetune.distill import card_lines
from finetune.data import per_class_note

PLOTS_DIR = "plots"
# The hub ids of what the offline zoo ships, so the card links the model to its parent and its data.
ZOO_BASE_MODELS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
ZOO_DATASETS = {"fashion-mnist": "zalando-datasets/fashion_mnist"}
# The usage snippet names the model on one line of its own, so `finetune push` can point it at the hub repo.
_MODEL_LINE = re.compile(r'^MODEL = "(local-dir:)?[^"\n]*"$', re.M)
_MAX_TABLE_LABELS = 20  # wider tables are unreadable in a card; the plots still show every label


def export_model(save, model, directory: Path, recipe, splits, metrics: dict, plots: bool = True) -> None:
    """`save(model, directory)` writes the weights and configs; the plots and the model card are written here.

    The plots go to `directory/plots` (the card embeds them, on the hub too) and to the run folder's `plots/`;
    plots=False leaves them out (a sweep's trial: the sweep draws them for its best trial, `write_card`).
    """
    from finetune.model import is_kit_model  # here: pushing a card must not import torch

    directory = Path(directory)
    with calibration.exported_threshold(recipe, metrics):  # a label set's threshold, moved with the folded logits
        save(model, directory)
        _keep_threshold(directory, recipe)
    calibration.copy_into(directory, recipe.output.dir)
    _keep_max_length(directory, recipe.data.max_length)  # a tokenizer's folder (text tasks)
    write_card(directory, recipe, splits, metrics, native=not is_kit_model(model), plots=plots)


def write_card(directory: Path, recipe, splits, metrics: dict, native: bool, plots: bool = True) -> None:
    """The model folder's README.md (and, with plots, the plots it embeds) from the run's metrics: at export, and
    again when a later step adds to metrics.json (a sweep's test of its best trial)."""
    directory = Path(directory)
    drawn = _write_plots(metrics, directory / PLOTS_DIR, Path(recipe.output.dir) / PLOTS_DIR) if plots else []
    card = model_card(recipe, splits, metrics, native=native, plots=drawn)
    partial = directory / "README.md.partial"
    partial.write_text(card)
    os.replace(partial, directory / "README.md")


def _keep_threshold(directory: Path, recipe) -> None:
    """A native transformers multi-label folder: the trained head.threshold in config.json's `finetune` block
    (transformers keeps unknown keys), where finetune.load reads it back; timm's and the kit's folders hold it
    already."""
    path = directory / "config.json"
    fields = _problem(recipe).config_fields(recipe.head)
    if not fields or not path.is_file() or (directory / "finetune.json").is_file():
        return
    config = json.loads(path.read_text())
    if "architecture" in config:  # timm's config: its own finetune block already holds the threshold
        return
    config["finetune"] = {"problem": recipe.head.problem, **fields}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _keep_max_length(directory: Path, max_length: int) -> None:
    """The tokenizer truncates at the training length, so `pipeline(..., truncation=True)` sees what training saw."""
    path = directory / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config["model_max_length"] = max_length
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _write_plots(metrics: dict, directory: Path, run_copy: Path) -> list[tuple[str, str]]:
    """(title, file name) of of the plots written; a plotting failure costs the pictures, never the trained model."""
    try:
        from finetune.plots import write_plots

        written = write_plots(metrics, directory)
    except Exception as error:  # matplotlib missing or broken, an odd metrics.json: the model still gets saved
        warnings.warn(f"no plots for this run ({error.__class__.__name__}: {error})")
        return []
    shutil.rmtree(run_copy, ignore_errors=True)
    shutil.copytree(directory, run_copy)
    return [(title, path.name) for title, path in written.items()]


# ---------------------------------------------------------------------------------------------------------------
# The model card


def base_model(recipe) -> str | None:
    """The hub id of the pretrained backbone, where there is one (a local folder or random init has none)."""
    name = recipe.backbone.name
    if not recipe.backbone.pretrained:
        return None
    if name in ZOO_BASE_MODELS:
        return ZOO_BASE_MODELS[name]
    from finetune.tasks import get_task

    return get_task(recipe.task).base_model(name)


def _hub_dataset(spec: str) -> str | None:
    if spec in ZOO_DATASETS:
        return ZOO_DATASETS[spec]
    return spec[len("hub:"):] if spec.startswith("hub:") else None


def _datasets(recipe) -> list[str]:
    found = [_hub_dataset(s) for s in (recipe.data.train, recipe.data.validation, recipe.data.test) if s is not None]
    return list(dict.fromkeys(d for d in found if d is not None))


def _problem(recipe):
    from finetune.problems import get

    return get(recipe.head.problem)


def _library(recipe) -> str:
    from finetune.tasks import get_task

    return get_task(recipe.task).library


def _input_kind(recipe) -> str:
    from finetune.tasks import get_task

    return get_task(recipe.task).inputs


def model_reference(recipe, native: bool) -> str:
    """What the usage snippet passes to the loader: the model folder (timm wants it as local-dir:)."""
    where = (Path(recipe.output.dir) / "model").as_posix()
    from finetune.tasks import get_task

    return get_task(recipe.task).model_reference(where, native)


def for_hub(card: str, repo_id: str) -> str:
    """The card with its usage snippet loading the hub repo instead of the local folder."""

    def swap(match: re.Match) -> str:
        return f'MODEL = "{"hf-hub:" if match.group(1) else ""}{repo_id}"'

    return _MODEL_LINE.sub(swap, card)


def _header(recipe, metrics: dict, native: bool, name: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    from finetune.tasks import get_task

    library = _library(recipe) if native else "finetune"
    results = []
    test = metrics.get("test") or {}
    dataset = recipe.data.test or recipe.data.train  # a zoo or hub set brings its own test split
    dataset_id = _hub_dataset(dataset)
    for metric, value in test.items():
        if metric == "loss" or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        results.append(
            EvalResult(
                task_type=recipe.task,
                dataset_type=dataset_id or Path(dataset).name,  # a file's name, not the author's local path
                dataset_name=dataset_id or Path(dataset).name,
                dataset_split="test",
                metric_type=metric,
                metric_value=round(float(value), 4),
                metric_name=f"test {metric}",
            )
        )
    tags = ["finetune", recipe.task, recipe.head.problem.replace("_", "-")]
    tags += get_task(recipe.task).card_tags(native)
    data = ModelCardData(
        library_name=library,
        pipeline_tag=recipe.task,
        tags=tags,
        base_model=base_model(recipe),
        datasets=_datasets(recipe) or None,
        model_name=name,
        eval_results=results or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _table(rows: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in rows.items() if isinstance(value, (int, float))]
    return "\n".join(lines)


def _source(splits, key: str, default: str = "") -> str:
    return str(splits.info.get("splits", {}).get(key, {}).get("source", default)).strip("'")


def _split_tables(splits) -> dict[str, dict]:
    return {
        key: table
        for key, table in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
        if table
    }


def _data_section(recipe, splits) -> list[str]:
    """Rows per split and per label (or the target's range for regression)."""
    info = splits.info.get("splits", {})
    tables = _split_tables(splits)
    labels = splits.label_names
    lines = [f"Training data: `{recipe.data.train}`."]
    if splits.info.get("validation_held_out_from_train"):
        lines[0] += (
            f" Validation is a stratified {recipe.data.val_fraction:.0%} of it, held out (rows in `split.json`)."
        )
    lines[0] += per_class_note(recipe)
    lines.append("")
    if labels and len(labels) <= _MAX_TABLE_LABELS:
        lines += ["| split | source | rows | " + " | ".join(labels) + " |", "|---" * (len(labels) + 3) + "|"]
        for key, table in tables.items():
            counts = _label_counts(table["label"], splits.problem, len(labels))
            source = _source(splits, key)
            lines.append(f"| {key} | `{source}` | {len(table['label'])} | " + " | ".join(map(str, counts)) + " |")
    elif labels:
        lines += ["| split | source | rows | smallest label | largest label |", "|---|---|---|---|---|"]
        for key, table in tables.items():
            counts = _label_counts(table["label"], splits.problem, len(labels))
            source = _source(splits, key)
            low, high = int(np.argmin(counts)), int(np.argmax(counts))
            lines.append(
                f"| {key} | `{source}` | {len(table['label'])} | {labels[low]} ({counts[low]}) | "
                f"{labels[high]} ({counts[high]}) |"
            )
    else:
        lines += ["| split | source | rows | target mean | min | max |", "|---|---|---|---|---|---|"]
        for key, table in tables.items():
            targets = np.asarray(table["label"], dtype=np.float64) * splits.target_std + splits.target_mean
            source = _source(splits, key)
            lines.append(
                f"| {key} | `{source}` | {len(targets)} | {targets.mean():.4g} | {targets.min():.4g} "
                f"| {targets.max():.4g} |"
            )
    note = _problem(recipe).card_data_note()
    if note:
        lines += ["", note]
    skipped = sum(len(part.get("skipped", [])) for part in info.values())
    if skipped:
        lines += ["", f"{skipped} unreadable image(s) were skipped (`data.skip_bad_images`); `split.json` lists them."]
    return lines + [""]


def _label_counts(encoded: list, problem: str, count: int) -> list[int]:
    from finetune.problems import get

    return get(problem).label_counts(encoded, count)


def _confusion_section(metrics: dict, plots: dict) -> list[str]:
    confusion = metrics.get("confusion")
    if not confusion or not confusion.get("matrix"):
        return []
    labels, matrix = confusion["labels"], confusion["matrix"]
    split = confusion.get("split", "test")
    lines = [f"### Confusion matrix ({split})", ""]
    if len(labels) <= _MAX_TABLE_LABELS:
        lines += [
            "Rows are the true labels, columns the predicted ones; counts.",
            "",
            "| true \\ predicted | " + " | ".join(labels) + " |",
            "|---" * (len(labels) + 1) + "|",
        ]
        lines += [
            f"| **{label}** | " + " | ".join(str(int(v)) for v in row) + " |" for label, row in zip(labels, matrix)
        ]
        lines.append("")
    if "Confusion matrix" in plots:
        lines += [f"![Confusion matrix, each row divided by its count]({PLOTS_DIR}/{plots['Confusion matrix']})", ""]
    return lines


def _per_label_section(metrics: dict, plots: dict) -> list[str]:
    per_label = metrics.get("per_label")
    if not per_label or not per_label.get("f1"):
        return []
    labels, f1 = per_label["labels"], per_label["f1"]
    support = per_label.get("support") or [""] * len(labels)
    lines = [f"### F1 per label ({per_label.get('split', 'test')})", "", "| label | F1 | support |", "|---|---|---|"]
    lines += [f"| {label} | {value:.4f} | {n} |" for label, value, n in zip(labels, f1, support)]
    lines.append("")
    if "F1 per label" in plots:
        lines += [f"![F1 per label]({PLOTS_DIR}/{plots['F1 per label']})", ""]
    return lines


def _usage(recipe, native: bool) -> str:
    from finetune.tasks import get_task

    return get_task(recipe.task).card_usage(recipe, model_reference(recipe, native), native)


def row_usage(recipe, reference: str, native: bool, vision: bool) -> str:
    """The "Use" section for one row of logits per input (the text and image tasks' `Task.card_usage`): the
    transformers pipeline, timm, or finetune.load for the kit's own format."""
    problem = _problem(recipe)
    example = (
        'image = Image.new("RGB", (256, 256), "gray")  # your picture: Image.open("photo.jpg").convert("RGB")'
        if vision else 'texts = ["your text here"]'
    )
    pairs = recipe.data.text_pair_column is not None
    if pairs:  # sentence pairs: the pipeline takes {"text", "text_pair"} inputs
        example = 'texts = [{"text": "your first text", "text_pair": "your second text"}]'

    if not native:
        what = "images" if vision else "texts"
        head = f"{recipe.head.type} head, {recipe.head.pooling} pooling"
        usage = (
            f"The head ({head}) has no {'timm' if vision else 'transformers'} class, so this folder is finetune's own "
            "format (the backbone's config, safetensors weights and `finetune.json`; no code). Load it with finetune "
            "(`pip install finetune`), or `finetune predict` on the command line:\n\n"
            "```python\nimport finetune\n" + ("from PIL import Image\n" if vision else "") + "\n"
            f'MODEL = "{reference}"\n'
            "model = finetune.load(MODEL)\n"
            f"{example}\n"
            f"print(model.predict({'[image]' if vision else 'texts'}))  # one dict per input: label(s) and scores\n"
            "```\n"
        )
        return usage + f"\n`model.predict` takes a list of {what} and batches them.\n" + _output_note(recipe)
    if vision:
        usage = (
            "This folder is a standard timm model (the preprocessing is in its `config.json`); finetune is not "
            "needed:\n\n"
            "```python\nimport timm\nimport torch\nfrom PIL import Image\n\n"
            f'MODEL = "{reference}"\n'
            "model = timm.create_model(MODEL, pretrained=True).eval()\n"
            "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))\n"
            f"{example}\n"
            "with torch.no_grad():\n"
            "    logits = model(transform(image).unsqueeze(0))[0]\n"
            f"{problem.timm_decode}```\n"
        )
    else:
        usage = (
            "This folder is a standard transformers model; finetune is not needed:\n\n"
            "```python\nfrom transformers import pipeline\n\n"
            f'MODEL = "{reference}"\n'
            'classify = pipeline("text-classification", model=MODEL, top_k=None)\n'
            f"{example}\n"
            "print(classify(texts, truncation=True))\n```\n"
        )
    return usage + _output_note(recipe)


def _output_note(recipe) -> str:
    return _problem(recipe).card_output_note(recipe.head)


def _what_it_does(recipe, splits, kind: str) -> str:
    labels = splits.label_names or []
    base = base_model(recipe)
    backbone = f"`{recipe.backbone.name}` backbone" + (f" ([{base}](https://huggingface.co/{base}))" if base else "")
    if not recipe.backbone.pretrained:
        backbone += " (random initial weights: trained from scratch)"
    head = {"mlp": "an mlp"}.get(recipe.head.type, f"a {recipe.head.type}")
    task = _problem(recipe).card_sentence(kind, labels, recipe.data.label_column)
    text = f"A {backbone} with {head} head, fine-tuned with finetune {__version__}: it {task}."
    text += contrastive.card_note(recipe)
    if recipe.lora is not None:
        text += (
            f" Fine-tuned with LoRA (r={getattr(recipe.lora, 'r', '?')}, alpha={getattr(recipe.lora, 'alpha', '?')}): "
            "these are the merged weights; the peft adapter alone is in the run's `adapter/` folder (pushed under "
            "`adapter/`)."
        )
    return text


def _limits(recipe, splits, metrics: dict, kind: str) -> list[str]:
    from finetune.tasks import get_task

    tables = _split_tables(splits)
    labels = splits.label_names
    lines = []
    train_rows = len(tables["train"]["label"])
    source = _source(splits, "train", recipe.data.train)
    if labels:
        lines.append(
            f"- Made for {kind}s like the {train_rows} it was trained on (`{source}`). It only knows the {len(labels)} "
            "labels above: any other input still gets one of them."
        )
    else:
        targets = np.asarray(tables["train"]["label"], dtype=np.float64) * splits.target_std + splits.target_mean
        lines.append(
            f"- Made for {kind}s like the {train_rows} it was trained on (`{source}`), whose targets ran from "
            f"{targets.min():.4g} to {targets.max():.4g}; far outside that range it extrapolates."
        )
    lines.append(get_task(recipe.task).card_input_limits(recipe))
    test = metrics.get("test") or {}
    if "test" in tables and "accuracy" in test:
        n = len(tables["test"]["label"])
        p = test["accuracy"]
        margin = 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n)
        lines.append(
            f"- The test metrics come from {n} {kind}s: accuracy {p:.3f} is known to about ±{margin:.3f} (95% normal "
            "interval), and only for data drawn like the test set."
        )
    elif "test" not in tables:
        lines.append("- There was no test split: the numbers below are validation numbers, used to pick the epoch.")
    lines.append(
        "- Not audited for bias, fairness or robustness to inputs unlike the training data. Measure it on your own "
        "labelled data before relying on it: `finetune eval MODEL --data yours.csv`."
    )
    return lines + [""]


def _health_section(metrics: dict) -> list[str]:
    """A run that learned nothing (finetune.health) says so where its numbers are read."""
    found = metrics.get("health") or {}
    if found.get("learned", True):
        return []
    return [f"**This run learned nothing:** {'; '.join(found['reasons'])}. Before using it, retrain with a lower "
            "`train.lr`, `train.head_lr: null` or more `train.epochs`, and read `finetune validate`'s label report.",
            ""]


def _calibration_section(metrics: dict, plots: dict) -> list[str]:
    line = calibration.card_line(metrics)
    if line is None:
        return []
    lines = [line, ""]
    if "Reliability" in plots:
        lines += [f"![Reliability before and after calibration]({PLOTS_DIR}/{plots['Reliability']})", ""]
    return lines


def _plots_section(plots: dict) -> list[str]:
    shown = [(title, name) for title, name in plots.items() if title in ("Loss", "Validation metrics", "Learning rate")]
    if not shown:
        return []
    lines = ["### Training curves", ""]
    for title, name in shown:
        lines += [f"![{title}]({PLOTS_DIR}/{name})", ""]
    return lines


def model_card(recipe, splits, metrics: dict, native: bool, plots: list | None = None) -> str:
    """model/README.md: hub metadata, what the model does, how to use it, its data, results, limits and recipe."""
    plots = dict(plots or [])
    kind = _input_kind(recipe)
    name = Path(recipe.output.dir).name
    labels = splits.label_names
    best = metrics.get("best", {})
    sections = [
        _header(recipe, metrics, native, name),
        f"# {name}",
        "",
        _what_it_does(recipe, splits, kind),
        "",
    ]
    if labels:
        note = _problem(recipe).card_labels_note(calibration.exported_head(recipe.head, metrics))
        sections += [f"Labels ({len(labels)}){note}: " + ", ".join(f"`{label}`" for label in labels) + ".", ""]
    with calibration.exported_threshold(recipe, metrics):  # the usage's threshold is the folder's
        usage = _usage(recipe, native)
    sections += ["## Use", "", usage, "## Training data", ""]
    sections += _data_section(recipe, splits)
    sections += ["## Results", ""]
    if best:
        ema = " (EMA weights)" if best.get("ema") else ""
        sections += [
            (f"Best evaluation at step {best['step']} (epoch {best.get('epoch')}){ema} of "
             f"{len(metrics.get('epochs', []))} (every {recipe.train.eval_every} steps), " if "step" in best else
             f"Best epoch {best.get('epoch')}{ema} of {len(metrics.get('epochs', []))}, ")
            + f"selected on validation `{recipe.eval.select_best}`.",
            "",
            "Validation:",
            "",
            _table({k: v for k, v in best.items() if k not in ("epoch", "step", "ema")}),
            "",
        ]
    if metrics.get("test"):
        sections += ["Test:", "", _table(metrics["test"]), ""]
    sections += card_lines(metrics)  # distill: the teacher's metrics beside these
    sections += _calibration_section(metrics, plots)
    sections += _health_section(metrics)
    sections += _confusion_section(metrics, plots)
    sections += _per_label_section(metrics, plots)
    sections += _plots_section(plots)
    sections += ["## Intended use and limits", ""]
    sections += _limits(recipe, splits, metrics, kind)
    run = metrics.get("train", {})
    if "seconds" in run:
        processes = run.get("processes", 1)
        sections += [
            "## Training",
            "",
            f"{run['seconds']:.3g} s of training at {run.get('samples_per_second', 0):.1f} samples/s "
            f"({processes} process{'es' if processes != 1 else ''}).",
            "",
        ]
    sections += ["## Recipe", "", "```yaml", recipe_module.to_yaml(recipe).rstrip(), "```", ""]
    return "\n".join(sections)
