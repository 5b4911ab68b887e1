"""The model: a backbone plus a head, built as the ecosystem's own class whenever that computes the same thing."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from finetune.backbones import HEAD_DROPOUT_KEYS, load_text_config, load_tokenizer
from finetune.errors import FinetuneError
from finetune.heads import ClassificationHead, pool

NATIVE_PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}
KIT_FORMAT_FILE = "finetune.json"


class TextClassifier(nn.Module):
    """A transformers backbone, a pooling rule and our head: for heads no transformers class computes."""

    def __init__(self, backbone: nn.Module, head: ClassificationHead, pooling: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pooling = pooling
        if pooling != "auto" and getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # unused weights would also stall DDP's gradient sync

    def forward(self, input_ids=None, attention_mask=None, **inputs) -> torch.Tensor:
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **inputs)
        return self.head(pool(outputs, attention_mask, self.pooling))


def is_native(recipe) -> bool:
    """A linear head on the standard pooled output is what `*ForSequenceClassification` computes."""
    return recipe.head.type == "linear" and recipe.head.pooling == "auto"


def num_outputs(problem: str, label_names: list[str] | None) -> int:
    return 1 if problem == "regression" else len(label_names)


def build_text_model(recipe, label_names: list[str] | None):
    """(model, tokenizer) for the recipe; label_names is None for regression."""
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
    tokenizer = load_tokenizer(source, trust)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    try:
        if is_native(recipe):
            for key in HEAD_DROPOUT_KEYS:
                if hasattr(config, key):
                    setattr(config, key, recipe.head.dropout)
            if recipe.backbone.pretrained:
                model = AutoModelForSequenceClassification.from_pretrained(source, config=config, trust_remote_code=trust)
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


def head_parameter_names(model: nn.Module) -> set[str]:
    """Parameters that are new (the head), as opposed to pretrained backbone weights."""
    if isinstance(model, TextClassifier):
        return {name for name, _ in model.named_parameters() if name.startswith("head.")}
    prefix = f"{model.base_model_prefix}."
    return {name for name, _ in model.named_parameters() if not name.startswith(prefix)}


def output_layer(model: nn.Module) -> nn.Linear:
    """The head's final linear layer (the one whose rows are the outputs)."""
    if isinstance(model, TextClassifier):
        return model.head.output
    head_names = head_parameter_names(model)
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" in head_names]
    return linears[-1]


@torch.no_grad()
def fold_target_scaling(model: nn.Module, mean: float, std: float) -> None:
    """Make a regression head trained on standardised targets predict in the targets' own units."""
    layer = output_layer(model)
    layer.weight.mul_(std)
    if layer.bias is not None:
        layer.bias.mul_(std).add_(mean)


def save_model(model: nn.Module, tokenizer, directory: Path, recipe, label_names: list[str] | None) -> None:
    """The ecosystem's own format when native; else backbone config + safetensors + finetune.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    if not isinstance(model, TextClassifier):
        model.save_pretrained(directory)
        return
    model.backbone.config.save_pretrained(directory)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    spec = {
        "format": "finetune",
        "task": recipe.task,
        "problem": recipe.head.problem,
        "labels": label_names,
        "threshold": recipe.head.threshold,
        "head": {"type": recipe.head.type, "hidden": recipe.head.hidden, "pooling": recipe.head.pooling},
        "num_outputs": num_outputs(recipe.head.problem, label_names),
    }
    (directory / KIT_FORMAT_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def load(directory: str | Path):
    """(model, tokenizer, spec) from a `model/` folder, native or kit format; weights from safetensors only."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    spec_path = directory / KIT_FORMAT_FILE
    if not spec_path.is_file():
        model = AutoModelForSequenceClassification.from_pretrained(directory)
        config = model.config
        problem = {v: k for k, v in NATIVE_PROBLEM_TYPES.items()}.get(config.problem_type, "single_label")
        labels = None if problem == "regression" else [config.id2label[i] for i in range(config.num_labels)]
        return model.eval(), tokenizer, {"format": "transformers", "problem": problem, "labels": labels}
    spec = json.loads(spec_path.read_text())
    config = AutoConfig.from_pretrained(directory)
    head = spec["head"]
    model = TextClassifier(
        AutoModel.from_config(config),
        ClassificationHead(config.hidden_size, spec["num_outputs"], head["hidden"]),
        head["pooling"],
    )
    model.load_state_dict(load_file(directory / "model.safetensors"))
    return model.eval(), tokenizer, spec
