"""Export: the `model/` folder (ecosystem format when native) and its model card."""

from __future__ import annotations

from pathlib import Path

from finetune import __version__
from finetune import recipe as recipe_module
from finetune.model import is_kit_model


def export_model(save, model, directory: Path, recipe, splits, metrics: dict) -> None:
    """`save(model, directory)` writes the weights and configs; the model card is written here."""
    save(model, directory)
    (directory / "README.md").write_text(model_card(recipe, splits, metrics, native=not is_kit_model(model)))


def _table(rows: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in rows.items()]
    return "\n".join(lines)


def _usage(recipe, native: bool) -> str:
    problem, vision = recipe.head.problem, recipe.task == "image-classification"
    if not native:
        return (
            f"The head ({recipe.head.type}, {recipe.head.pooling} pooling) has no {'timm' if vision else 'transformers'} "
            "class, so this folder is finetune's own format (backbone config, safetensors weights, `finetune.json`):\n\n"
            "```python\nimport finetune\n\nmodel, preprocess, spec = finetune.load(\"path/to/model\")\n```\n"
        )
    if vision:
        usage = (
            "This folder is a standard timm model: no finetune install is needed.\n\n"
            "```python\nimport timm, torch\nfrom PIL import Image\n\n"
            'model = timm.create_model("local-dir:path/to/model", pretrained=True).eval()\n'
            "config = timm.data.resolve_model_data_config(model)\n"
            "transform = timm.data.create_transform(**config)\n"
            'logits = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))\n'
            "label = model.pretrained_cfg[\"label_names\"][logits.argmax(-1).item()]\n```\n"
        )
    else:
        usage = (
            "This folder is a standard transformers model: no finetune install is needed.\n\n"
            "```python\nfrom transformers import pipeline\n\n"
            'classify = pipeline("text-classification", model="path/to/model")\n'
            'print(classify("your text here", truncation=True))\n```\n'
        )
    if problem == "multi_label":
        usage += f"\nScores are per-label sigmoids; a label applies when its score exceeds {recipe.head.threshold}.\n"
    if problem == "regression":
        usage += "\nThe output is the predicted value, in the training targets' units.\n"
    return usage


def model_card(recipe, splits, metrics: dict, native: bool) -> str:
    problem = recipe.head.problem
    info = splits.info
    counts = ", ".join(f"{key} {part['count']} ({part['source']})" for key, part in info["splits"].items())
    labels = splits.label_names
    usage = _usage(recipe, native)
    kind = "image" if recipe.task == "image-classification" else "text"
    library = ("timm" if kind == "image" else "transformers") if native else "finetune"
    sections = [
        "---",
        f"library_name: {library}",
        f"pipeline_tag: {recipe.task}",
        f"tags: [finetune, {recipe.task}]",
        "---",
        "",
        f"# {Path(recipe.output.dir).name}",
        "",
        f"A `{recipe.backbone.name}` backbone fine-tuned for {problem.replace('_', '-')} {kind} classification with "
        f"finetune {__version__}.",
        "",
        "## Use",
        "",
        usage,
        "## Data",
        "",
        f"Training data: `{recipe.data.train}`; rows per split: {counts}.",
        f"Labels ({len(labels)}): {', '.join(labels)}." if labels else
        f"Target: mean {splits.target_mean:.4g}, standard deviation {splits.target_std:.4g} in training.",
        "",
        "## Results",
        "",
        f"Best epoch {metrics['best']['epoch']}{' (EMA weights)' if metrics['best'].get('ema') else ''}, selected on "
        f"validation `{recipe.eval.select_best}`.",
        "",
        "Validation:",
        "",
        _table({k: v for k, v in metrics["best"].items() if k not in ("epoch", "ema")}),
        "",
    ]
    if "test" in metrics:
        sections += ["Test:", "", _table(metrics["test"]), ""]
    sections += [
        f"Training: {metrics['train']['seconds']:.0f} s at {metrics['train']['samples_per_second']:.1f} samples/s.",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_module.to_yaml(recipe).rstrip(),
        "```",
        "",
    ]
    return "\n".join(sections)
