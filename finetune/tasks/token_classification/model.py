"""Token classification's model: transformers' `AutoModelForTokenClassification`, built, saved and loaded back."""

from __future__ import annotations

from pathlib import Path

from finetune.backbones import HEAD_DROPOUT_KEYS
from finetune.errors import FinetuneError
from finetune.model import read_folder_config, read_kit_spec


def build_token_model(recipe, names: list[str], config, source: str, tokenizer):
    """transformers' `AutoModelForTokenClassification` with the tags as id2label (what exports natively)."""
    from transformers import AutoModelForTokenClassification

    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    for key in HEAD_DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, recipe.head.dropout)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    trust = recipe.backbone.trust_remote_code
    try:
        if recipe.backbone.pretrained:
            return AutoModelForTokenClassification.from_pretrained(source, config=config, trust_remote_code=trust)
        return AutoModelForTokenClassification.from_config(config, trust_remote_code=trust)
    except (OSError, ValueError) as error:
        raise FinetuneError(
            f"backbone.name: cannot build a token-classification model from '{recipe.backbone.name}' ({error})"
        ) from None


def save_token_model(model, tokenizer, directory: Path) -> None:
    """transformers' own folder: the tokenizer and the model with its tags as id2label."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)


def is_token_folder(directory: Path) -> bool:
    """transformers' folder (no finetune.json) of a `*ForTokenClassification` model."""
    architectures = read_folder_config(directory).get("architectures") or []
    return read_kit_spec(directory) is None and any(name.endswith("ForTokenClassification") for name in architectures)


def load_token_model(directory: Path):
    """(model, tokenizer, spec) from transformers' token-classification folder; the spec's labels are the tags."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForTokenClassification.from_pretrained(directory)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    spec = {"format": "transformers", "task": "token-classification", "problem": "tags", "labels": labels}
    return model.eval(), tokenizer, spec

