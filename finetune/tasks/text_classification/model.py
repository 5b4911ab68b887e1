"""Text classification's model: built from the recipe, saved as transformers' folder or finetune's, loaded back."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from finetune.backbones import HEAD_DROPOUT_KEYS, load_text_config, load_tokenizer
from finetune.errors import FinetuneError
from finetune.heads import ClassificationHead
from finetune.model import (
    TIMM_CONFIG_KEY,
    TextClassifier,
    is_kit_model,
    is_native,
    num_outputs,
    read_folder_config,
    read_kit_spec,
    save_kit_weights_and_spec,
)

NATIVE_PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


def build_text_model(recipe, label_names: list[str] | None, tokenizer=None):
    """(model, tokenizer) for the recipe; label_names is None for regression; `tokenizer`: the backbone's, when the
    caller has loaded it already."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    problem = recipe.head.problem
    outputs = num_outputs(problem, label_names)
    names = label_names or ["value"]
    source, config = load_text_config(
        recipe,
        num_labels=outputs,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        problem_type=NATIVE_PROBLEM_TYPES[problem],
    )
    trust = recipe.backbone.trust_remote_code
    if tokenizer is None:
        tokenizer = load_tokenizer(source, trust)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    try:
        if is_native(recipe):
            for key in HEAD_DROPOUT_KEYS:
                if hasattr(config, key):
                    setattr(config, key, recipe.head.dropout)
            if recipe.backbone.pretrained:
                model = AutoModelForSequenceClassification.from_pretrained(
                    source, config=config, trust_remote_code=trust
                )
            else:
                model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust)
        else:
            if recipe.backbone.pretrained:
                backbone = AutoModel.from_pretrained(source, config=config, trust_remote_code=trust)
            else:
                backbone = AutoModel.from_config(config, trust_remote_code=trust)
            head = ClassificationHead(config.hidden_size, outputs, recipe.head.hidden, recipe.head.dropout)
            model = TextClassifier(backbone, head, recipe.head.pooling)
    except (OSError, ValueError) as error:
        raise FinetuneError(f"backbone.name: cannot build a model from '{recipe.backbone.name}' ({error})") from None
    return model, tokenizer


def save_model(model: nn.Module, tokenizer, directory: Path, recipe, label_names: list[str] | None) -> None:
    """The ecosystem's own format when native; else backbone config + safetensors + finetune.json."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    if not is_kit_model(model):
        model.save_pretrained(directory)
        return
    model.backbone.config.save_pretrained(directory)
    save_kit_weights_and_spec(model, directory, recipe, label_names)


def is_text_folder(directory: Path) -> bool:
    """A transformers config (no timm `architecture`) with finetune's own head, or with a sequence-classification
    head of transformers'."""
    config = read_folder_config(directory)
    if "model_type" not in config or "architecture" in config:
        return False
    architectures = config.get("architectures") or []
    return read_kit_spec(directory) is not None or any(a.endswith("ForSequenceClassification") for a in architectures)


def load_text_model(directory: Path):
    """(model, tokenizer, spec) from a transformers sequence-classification folder or finetune's own text format."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from finetune.problems import get

    spec = read_kit_spec(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if spec is None:
        model = AutoModelForSequenceClassification.from_pretrained(directory)
        config = model.config
        problem = {v: k for k, v in NATIVE_PROBLEM_TYPES.items()}.get(config.problem_type, "single_label")
        labels = get(problem).labels_of_config(config)
        spec = {"format": "transformers", "problem": problem, "labels": labels}
        kept = getattr(config, TIMM_CONFIG_KEY, None)  # the trained head.threshold (model_folder._keep_threshold)
        spec.update(get(problem).read_config_fields(kept))
        return model.eval(), tokenizer, spec
    config = AutoConfig.from_pretrained(directory)
    head = spec["head"]
    model = TextClassifier(
        AutoModel.from_config(config),
        ClassificationHead(config.hidden_size, spec["num_outputs"], head["hidden"]),
        head["pooling"],
    )
    model.load_state_dict(load_file(directory / "model.safetensors"))
    return model.eval(), tokenizer, spec
