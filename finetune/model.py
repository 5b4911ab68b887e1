"""The model interface every caller asks, the wrappers that implement it, and what the tasks' model folders share."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import FinetuneError
from finetune.heads import ClassificationHead, pool

KIT_FORMAT_FILE = "finetune.json"
TIMM_CONFIG_KEY = "finetune"  # our extra block in a timm config.json: problem and threshold (timm ignores it)


class ModelInterface:
    """What transfer, train and export ask of a model, whichever class holds it: one interface over every kind, as
    timm's `forward_features` / `reset_classifier` / `group_matcher` are one over a thousand architectures.

    The kit's wrappers (TextClassifier, TimmClassifier, VisionClassifier, transfer.CachedHead) implement it; a bare
    transformers model (the native text and token classes) is asked through TransformersModel, a view over it.
    `interface_of(model)` gives either. A LoRA (peft) model is asked through the model inside it
    (transfer.unwrap_lora); merging the adapters is peft's own `merge_and_unload` for every kind (transfer.merged).
    """

    kit_format = False  # model/ is finetune's own format: no transformers or timm class computes this model
    on_features = False  # its batches are cached features of a frozen backbone, not the task's inputs

    def library_model(self) -> nn.Module:
        """The transformers or timm model inside, whose own switches the kit calls (gradient checkpointing, input
        embeddings, config, group_matcher, pretrained_cfg)."""
        raise NotImplementedError(f"{type(self).__name__} holds no library model")

    def head_parameter_names(self) -> set[str]:
        """Parameters that are new (the head), as opposed to pretrained backbone weights."""
        raise NotImplementedError

    def output_layer(self) -> nn.Module:
        """The head's final linear layer (the one whose rows are the outputs; a 1x1 conv in a few timm models)."""
        raise NotImplementedError

    def separable_head(self) -> bool:
        """True when the head can run on features computed once (`features`, then `head_on_features`)."""
        return False

    def features(self, batch: dict) -> torch.Tensor:
        """What the head sees of a batch: cached features of a frozen backbone are computed from this."""
        raise NotImplementedError(f"{type(self).__name__}: the head cannot be separated from its backbone")

    def head_on_features(self, features: torch.Tensor) -> torch.Tensor:
        """The head's outputs from `features`: the same as the whole model's on the batch."""
        raise NotImplementedError(f"{type(self).__name__}: the head cannot be separated from its backbone")

    def layer_ids(self, names: list[str]) -> tuple[list[int], int]:
        """(depth of each named backbone parameter, top depth) for layer-wise lr decay and staged unfreezing: 0 for
        the embeddings or stem, counting upwards. `names` are this model's own (adapter parts taken out)."""
        return numbered_layer_ids(names)

    def lora_targets(self, head: set[str]) -> list[str]:
        """The module names LoRA wraps when lora.target_modules is auto; `head`: the head's modules, left out."""
        raise NotImplementedError(f"{type(self).__name__} takes no LoRA adapters")

    def enable_gradient_checkpointing(self, lora: bool = False) -> None:
        """transformers' or timm's own switch for recomputing activations in the backward pass."""
        inner = self.library_model()
        if hasattr(inner, "gradient_checkpointing_enable"):
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if lora:  # frozen embeddings output no grad: checkpointed layers need an input that has one
                inner.enable_input_require_grads()
        elif hasattr(inner, "set_grad_checkpointing"):
            inner.set_grad_checkpointing(True)
        else:
            raise FinetuneError(f"train.gradient_checkpointing: {type(inner).__name__} has no gradient checkpointing")

    def word_embeddings(self) -> nn.Module | None:
        """A transformers backbone's input (word) embeddings; None for models without them (images)."""
        inner = self.library_model()
        return inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None

    def model_to_save(self) -> nn.Module:
        """The plain model the run exports (for a cached-feature head: the whole model it belongs to)."""
        return self

    def keep_layers(self, count: int) -> tuple[list[int], int]:
        """backbone.layers: keep `count` of the backbone's pretrained layers, evenly spaced (the first and the last
        kept), their weights as they are; the saved folder then describes the shallower model. Returns (kept
        indices, layers before)."""
        raise FinetuneError(f"backbone.layers: {type(self).__name__} has no layers to trim; pick a smaller model")

    def gradcam_layer(self) -> nn.Module | None:
        """Grad-CAM's layer: the last stage timm's `feature_info` names (a convolutional net's last stage, whose
        output is a map of channels; a ViT's last block, its patch tokens laid out as their grid: `token_grid`);
        None for models without stages (text)."""
        inner = self.library_model()
        info = getattr(inner, "feature_info", None)
        if not info:
            return None
        stage = inner.get_submodule(info[-1]["module"])
        prefix = getattr(inner, "num_prefix_tokens", None)
        return stage if prefix is None else token_grid(stage, prefix, getattr(inner.patch_embed, "grid_size", None))


class TransformersModel(ModelInterface):
    """The interface over a bare transformers model (`*ForSequenceClassification`, `*ForTokenClassification`): a
    view, so the model itself, its parameter names and its saved folder stay transformers' own."""

    def __init__(self, model: nn.Module):
        self.model = model

    def library_model(self) -> nn.Module:
        return self.model

    def head_parameter_names(self) -> set[str]:
        prefix = f"{self.model.base_model_prefix}."
        return {name for name, _ in self.model.named_parameters() if not name.startswith(prefix)}

    def output_layer(self) -> nn.Module:
        head_names = self.head_parameter_names()
        named = self.model.named_modules()
        return [m for n, m in named if isinstance(m, nn.Linear) and f"{n}.weight" in head_names][-1]

    def separable_head(self) -> bool:
        # transformers' BERT-style classes: classifier(dropout(pooler_output)); others differ, so no cache for them
        model = self.model
        base = getattr(model, getattr(model, "base_model_prefix", ""), None)
        return (
            base is not None
            and isinstance(getattr(model, "classifier", None), nn.Linear)
            and isinstance(getattr(model, "dropout", None), nn.Dropout)
            and getattr(base, "pooler", None) is not None
        )

    def features(self, batch: dict) -> torch.Tensor:
        return getattr(self.model, self.model.base_model_prefix)(**batch).pooler_output

    def head_on_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(self.model.dropout(features))

    def lora_targets(self, head: set[str]) -> list[str]:
        return transformers_lora_targets(self.model, self.model.config, head)

    def model_to_save(self) -> nn.Module:
        return self.model

    def keep_layers(self, count: int) -> tuple[list[int], int]:
        from finetune.backbones import keep_transformers_layers

        return keep_transformers_layers(self.model, count)


def interface_of(model: nn.Module) -> ModelInterface:
    """The model's interface: a kit wrapper is its own, a bare transformers model is asked through a view."""
    return model if isinstance(model, ModelInterface) else TransformersModel(model)


class BackboneAndHead(ModelInterface, nn.Module):
    """The kit's own composition, a backbone and our head (`self.backbone`, `self.head`): what its interface answers
    is the same whether the backbone is transformers' or timm's."""

    kit_format = True

    def library_model(self) -> nn.Module:
        return self.backbone

    def head_parameter_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.startswith("head.")}

    def output_layer(self) -> nn.Module:
        return self.head.output

    def separable_head(self) -> bool:
        return True

    def head_on_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class TextClassifier(BackboneAndHead):
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

    def features(self, batch: dict) -> torch.Tensor:
        outputs = self.backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                **{k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")})
        return pool(outputs, batch.get("attention_mask"), self.pooling)

    def lora_targets(self, head: set[str]) -> list[str]:
        return transformers_lora_targets(self, self.backbone.config, head)

    def keep_layers(self, count: int) -> tuple[list[int], int]:
        from finetune.backbones import keep_transformers_layers

        return keep_transformers_layers(self.backbone, count)


class TimmClassifier(ModelInterface, nn.Module):
    """A timm model with its own classifier, called as `model(pixel_values=...)`: the native vision model.

    Only the calling convention is ours: the trainer's batches are keyword dicts, timm models take one tensor. The
    timm model is `.model`, and that is what is exported, so the folder is plain timm. head_dropout: the recipe's
    backbone.dropout (timm's drop_rate, in front of the classifier), applied when the head runs on cached features.
    """

    def __init__(self, model: nn.Module, head_dropout: float = 0.0):
        super().__init__()
        self.model = model
        self.head_dropout = head_dropout

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)

    def library_model(self) -> nn.Module:
        return self.model

    def head_parameter_names(self) -> set[str]:
        # timm's classifier, whatever the model calls it (fc, head, classifier)
        new = {id(p) for p in self.model.get_classifier().parameters()}
        return {name for name, p in self.named_parameters() if id(p) in new}

    def output_layer(self) -> nn.Module:
        return self.model.get_classifier()

    def separable_head(self) -> bool:
        return True

    def features(self, batch: dict) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(batch["pixel_values"]), pre_logits=True)

    def head_on_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.get_classifier()(F.dropout(features, self.head_dropout, self.training))

    def layer_ids(self, names: list[str]) -> tuple[list[int], int]:
        return timm_layer_ids(self.model, "model.", names)

    def lora_targets(self, head: set[str]) -> list[str]:
        return timm_lora_targets(self, head)

    def keep_layers(self, count: int) -> tuple[list[int], int]:
        from finetune.backbones import keep_timm_blocks

        return keep_timm_blocks(self.model, count)


class VisionClassifier(BackboneAndHead):
    """A timm backbone's pooled features and our head: for heads timm's own classifier does not compute."""

    def __init__(self, backbone: nn.Module, head: ClassificationHead):
        super().__init__()
        self.backbone = backbone  # built with num_classes=0: no classifier weights to carry around
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(pixel_values)
        return self.head(self.backbone.forward_head(features, pre_logits=True))

    def features(self, batch: dict) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(batch["pixel_values"]), pre_logits=True)

    def layer_ids(self, names: list[str]) -> tuple[list[int], int]:
        return timm_layer_ids(self.backbone, "backbone.", names)

    def lora_targets(self, head: set[str]) -> list[str]:
        return timm_lora_targets(self, head)

    def keep_layers(self, count: int) -> tuple[list[int], int]:
        from finetune.backbones import keep_timm_blocks

        return keep_timm_blocks(self.backbone, count)


def token_grid(block: nn.Module, prefix: int, grid_size) -> nn.Module:
    """An identity layer that the patch tokens entering a ViT's last block pass through as a map [batch, channels,
    rows, columns] (the class and register tokens left aside), so that Grad-CAM reads them as a convolutional stage's
    output. Its input, not its output: a class-token head reads nothing else of the last block's patch tokens.
    Installed once, as a forward pre-hook on the block; values are unchanged."""
    grid = block.__dict__.get("token_grid")  # kept outside the module tree: the state dict stays the model's own
    if grid is not None:
        return grid
    grid = nn.Identity()

    def through_grid(module, inputs):
        tokens, *rest = inputs
        patches = tokens[:, prefix:]
        b, n, d = patches.shape
        rows, columns = grid_size if grid_size and grid_size[0] * grid_size[1] == n else (round(n ** 0.5),) * 2
        maps = grid(patches.transpose(1, 2).reshape(b, d, rows, columns))
        return (torch.cat([tokens[:, :prefix], maps.flatten(2).transpose(1, 2)], 1), *rest)

    block.register_forward_pre_hook(through_grid)
    block.__dict__["token_grid"] = grid
    return grid


# ---------------------------------------------------------------------------------------------------------------
# What the interface's methods share: layer depths and LoRA's auto targets, the transformers way and the timm way

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def numbered_layer_ids(names: list[str]) -> tuple[list[int], int]:
    """transformers models: parameters before the first numbered layer (embeddings) are 0, layer i is i + 1, and
    what follows the last layer (final norm, pooler) shares the top id."""
    ids, seen_layer, last = [], False, 0
    for name in names:
        match = _LAYER.search(name)
        if match:
            seen_layer, last = True, max(last, int(match.group(1)) + 1)
            ids.append(int(match.group(1)) + 1)
        else:
            ids.append(None if seen_layer else 0)  # after the layers: the top, filled in below
    top = last + 1 if any(v is None for v in ids) else last
    return [top if v is None else v for v in ids], top


def timm_layer_ids(timm_model: nn.Module, prefix: str, names: list[str]) -> tuple[list[int], int]:
    """timm's own `group_matcher` (stem 0, one id per block, then the final convs/norms) for the names under
    `prefix` (the timm model's place in the wrapper); numbered layers for a model without one."""
    if not hasattr(timm_model, "group_matcher"):
        return numbered_layer_ids(names)
    from timm.models import group_parameters

    inner = dict(group_parameters(timm_model, timm_model.group_matcher(coarse=False), reverse=True))
    ids = [inner.get(name[len(prefix):], 0) if name.startswith(prefix) else 0 for name in names]
    return ids, max(ids, default=0)


def transformers_lora_targets(model: nn.Module, config, head: set[str]) -> list[str]:
    """peft's own table for the backbone's model_type; a text backbone peft has no entry for gets every linear
    layer of the backbone."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    known = PEFT_TABLE.get(getattr(config, "model_type", None))
    if known:
        return list(known)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not inside(n, head)]


def timm_lora_targets(model: nn.Module, head: set[str]) -> list[str]:
    """Ours, for timm backbones: the attention projections (`qkv`, `proj`) of attention models such as ViT, else every
    pointwise (1x1, ungrouped) convolution of a convolutional net (EfficientNet's `conv_pw`/`conv_pwl`/`conv_head`,
    ResNet's bottleneck 1x1s)."""
    modules = [(n, m) for n, m in model.named_modules() if not inside(n, head)]
    attention = [
        n for n, m in modules
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ("qkv", "proj") and ".attn." in f".{n}"
    ]
    if attention:
        return attention
    pointwise = [
        n for n, m in modules if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
    ]
    if pointwise:
        return pointwise
    linear = [n for n, m in modules if isinstance(m, nn.Linear)]
    if not linear:
        raise FinetuneError("lora.target_modules: auto found no layer to adapt in this backbone; name them in a list")
    return linear


def inside(name: str, modules: set[str]) -> bool:
    """True when the module `name` is one of `modules` or sits inside one."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def is_kit_model(model: nn.Module) -> bool:
    """True when the model exports in finetune's own format (no ecosystem class computes it)."""
    return interface_of(model).kit_format


def is_native(recipe) -> bool:
    """A linear head on the standard pooled output is what `*ForSequenceClassification` computes."""
    return recipe.head.type == "linear" and recipe.head.pooling == "auto"


def num_outputs(problem: str, label_names: list[str] | None) -> int:
    from finetune.problems import get

    return get(problem).num_outputs(label_names)


def timm_model_of(model: nn.Module) -> nn.Module:
    """The timm model inside either vision kind (what carries pretrained_cfg and takes channels_last)."""
    return interface_of(model).library_model()


def head_parameter_names(model: nn.Module) -> set[str]:
    """Parameters that are new (the head), as opposed to pretrained backbone weights."""
    return interface_of(model).head_parameter_names()


def output_layer(model: nn.Module) -> nn.Module:
    """The head's final linear layer (the one whose rows are the outputs; a 1x1 conv in a few timm models)."""
    return interface_of(model).output_layer()


@torch.no_grad()
def fold_target_scaling(model: nn.Module, mean: float, std: float) -> None:
    """Make a regression head trained on standardised targets predict in the targets' own units."""
    layer = output_layer(model)
    layer.weight.mul_(std)
    if layer.bias is not None:
        layer.bias.mul_(std).add_(mean)


@torch.no_grad()
def fold_temperature(model: nn.Module, temperature: float) -> None:
    """Divide the output layer's weight and bias by `temperature`: the model's logits become logits / temperature,
    so any loader of its folder computes the calibrated scores (finetune.calibration)."""
    layer = output_layer(model)
    layer.weight.div_(temperature)
    if layer.bias is not None:
        layer.bias.div_(temperature)


# ---------------------------------------------------------------------------------------------------------------
# What the tasks' model folders share: finetune's own format (weights + finetune.json) and reading a folder's files


def save_kit_weights_and_spec(model: nn.Module, directory: Path, recipe, label_names: list[str] | None) -> None:
    """finetune's own format: the whole model's weights as safetensors and finetune.json (task, problem, labels,
    head), which its task reads back."""
    from safetensors.torch import save_file

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


def read_kit_spec(directory: Path) -> dict | None:
    """A model folder's finetune.json (finetune's own format), or None for a transformers or timm folder."""
    spec_path = Path(directory) / KIT_FORMAT_FILE
    return json.loads(spec_path.read_text()) if spec_path.is_file() else None


def read_folder_config(directory: Path) -> dict:
    """A model folder's config.json (transformers' or timm's), or {} where it has none."""
    config_path = Path(directory) / "config.json"
    return json.loads(config_path.read_text()) if config_path.is_file() else {}
