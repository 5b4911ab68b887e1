"""Export: the `model/` folder (ecosystem format when native) and its model card."""

from __future__ import annotations

from pathlib import Path

from finetune import __version__
from finetune import recipe as recipe_module
from finetune.model import TextClassifier, save_model


def export_model(model, tokenizer, directory: Path, recipe, splits, metrics: dict) -> None:
    save_model(model, tokenizer, directory, recipe, splits.label_names)
    native = not isinstance(model, TextClassifier)
    (directory / "README.md").write_text(model_card(recipe, splits, metrics, native))


def _table(rows: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in rows.items()]
    return "\n".join(lines)


def model_card(recipe, splits, metrics: dict, native: bool) -> str:
    problem = recipe.head.problem
    info = splits.info
    counts = ", ".join(f"{key} {part['count']} ({part['source']})" for key, part in info["splits"].items())
    labels = splits.label_names
    if native:
        usage = (
            "This folder is a standard transformers model: no finetune install is needed.\n\n"
            "```python\nfrom transformers import pipeline\n\n"
            'classify = pipeline("text-classification", model="path/to/model")\n'
            'print(classify("your text here", truncation=True))\n```\n'
        )
        if problem == "multi_label":
            usage += f"\nScores are per-label sigmoids; a label applies when its score exceeds {recipe.head.threshold}.\n"
        if problem == "regression":
            usage += "\nThe score is the predicted value, in the training targets' units.\n"
    else:
        usage = (
            f"The head ({recipe.head.type}, {recipe.head.pooling} pooling) has no transformers class, so this folder "
            "is finetune's own format (backbone config, tokenizer, safetensors weights, `finetune.json`):\n\n"
            "```python\nimport finetune\n\nmodel, tokenizer, spec = finetune.load(\"path/to/model\")\n```\n"
        )
    sections = [
        "---",
        "library_name: transformers" if native else "library_name: finetune",
        "pipeline_tag: text-classification",
        "tags: [finetune, text-classification]",
        "---",
        "",
        f"# {Path(recipe.output.dir).name}",
        "",
        f"A `{recipe.backbone.name}` backbone fine-tuned for {problem.replace('_', '-')} text classification with "
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
        f"Best epoch {metrics['best']['epoch']} (selected on validation `{recipe.eval.select_best}`).",
        "",
        "Validation:",
        "",
        _table({k: v for k, v in metrics["best"].items() if k != "epoch"}),
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
