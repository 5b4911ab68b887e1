"""How much of the pretrained backbone trains: LoRA adapters (peft), freezing schedules, layer depths, cached
features."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import FinetuneError
from finetune.heads import pool
from finetune.model import TextClassifier, TimmClassifier, VisionClassifier, head_parameter_names

# ---------------------------------------------------------------------------------------------------------------
# LoRA


def lora_target_modules(model: nn.Module, targets) -> list[str]:
    """The module names LoRA wraps: the recipe's list, or for `auto` peft's table (transformers) or ours (timm).

    Ours, for timm backbones: the attention projections (`qkv`, `proj`) of attention models such as ViT, else every
    pointwise (1x1, ungrouped) convolution of a convolutional net (EfficientNet's `conv_pw`/`conv_pwl`/`conv_head`,
    ResNet's bottleneck 1x1s). A text backbone peft has no entry for gets every linear layer of the backbone.
    """
    head = _head_module_names(model)
    if targets != "auto":
        names = [n for n, _ in model.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise FinetuneError(
                f"lora.target_modules: no module named {', '.join(map(repr, missing))} in this backbone; "
                "use auto, or names such as " + ", ".join(_example_names(model))
            )
        return list(targets)
    if isinstance(model, (TimmClassifier, VisionClassifier)):
        return _timm_targets(model, head)
    config = getattr(model, "config", None) or getattr(getattr(model, "backbone", None), "config", None)
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    known = PEFT_TABLE.get(getattr(config, "model_type", None))
    if known:
        return list(known)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _inside(n, head)]


def _timm_targets(model: nn.Module, head: set[str]) -> list[str]:
    modules = [(n, m) for n, m in model.named_modules() if not _inside(n, head)]
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


def _head_module_names(model: nn.Module) -> set[str]:
    """The smallest modules that own the head's parameters: what peft keeps trainable and saves in full."""
    head = head_parameter_names(model)
    owners = {name.rsplit(".", 1)[0] for name in head}
    return {o for o in owners if not any(o != other and o.startswith(other + ".") for other in owners)}


def _inside(name: str, modules: set[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _example_names(model: nn.Module) -> list[str]:
    leaves = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return list(dict.fromkeys(leaves))[:6]


def apply_lora(model: nn.Module, lora) -> nn.Module:
    """Wrap the model with peft LoRA adapters; the head is listed in `modules_to_save`, so it trains and is saved."""
    from peft import LoraConfig, get_peft_model

    head = _head_module_names(model)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(model, lora.target_modules),
        bias=lora.bias,
        # peft matches these as name suffixes: the full names keep e.g. "head" from also catching "conv_head"
        modules_to_save=sorted(head),
    )
    peft_model = get_peft_model(model, config)
    wrong = [
        n for n, p in peft_model.named_parameters()
        if p.requires_grad and "lora_" not in n and "modules_to_save" not in n and not n.endswith(".bias")
    ]
    if wrong:  # a peft matching surprise would silently train backbone weights in full
        raise FinetuneError(f"lora: peft made backbone weights trainable ({', '.join(wrong[:3])}); name target_modules")
    return peft_model


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into the weights (and the trained head in place)."""
    return model.merge_and_unload() if is_lora(model) else model


def plain_model(model: nn.Module) -> nn.Module:
    """Under LoRA, the wrapped model (with adapter layers); else the model itself."""
    return model.get_base_model() if is_lora(model) else model


# ---------------------------------------------------------------------------------------------------------------
# Layer depths: layer-wise lr decay and staged unfreezing both count layers from the embeddings (0) upwards.

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """({backbone parameter name: depth}, top depth); head parameters are left out (they sit above the top).

    timm models use their own `group_matcher` (stem 0, one id per block, then the final convs/norms); transformers
    models: parameters before the first numbered layer (embeddings) are 0, layer i is i + 1, and what follows the
    last layer (final norm, pooler) shares the top id.
    """
    head = head_parameter_names(plain_model(model)) | {n for n, _ in model.named_parameters() if "modules_to_save" in n}
    names = [n for n, _ in model.named_parameters() if n not in head]
    timm_model = _timm_inside(model)
    if timm_model is not None and hasattr(timm_model, "group_matcher"):
        from timm.models import group_parameters

        inner = dict(group_parameters(timm_model, timm_model.group_matcher(coarse=False), reverse=True))
        prefix = _prefix_of(model, timm_model)
        ids = {n: inner.get(_strip_adapter(n[len(prefix):]), 0) for n in names}
        return ids, max(ids.values(), default=0)
    ids, seen_layer, last = {}, False, 0
    for name in names:
        match = _LAYER.search(name)
        if match:
            seen_layer, last = True, max(last, int(match.group(1)) + 1)
            ids[name] = int(match.group(1)) + 1
        else:
            ids[name] = None if seen_layer else 0  # after the layers: the top, filled in below
    top = last + 1 if any(v is None for v in ids.values()) else last
    return {n: (top if v is None else v) for n, v in ids.items()}, top


_ADAPTER_PART = re.compile(r"\.(?:base_layer|lora_[A-Za-z_]+\.[^.]+)(?=\.)")


def _strip_adapter(name: str) -> str:
    """A peft parameter's name as in the plain model: `x.lora_A.default.weight` and `x.base_layer.weight` ->
    `x.weight`."""
    return _ADAPTER_PART.sub("", name)


def _timm_inside(model: nn.Module) -> nn.Module | None:
    base = plain_model(model)
    if isinstance(base, TimmClassifier):
        return base.model
    if isinstance(base, VisionClassifier):
        return base.backbone
    return None


def _prefix_of(model: nn.Module, inner: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is inner:
            return f"{name}." if name else ""
    return ""


def layer_decay_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """lr multiplier per backbone parameter: decay ** (layers between it and the head)."""
    ids, top = layer_ids(model)
    return {name: decay ** (top + 1 - depth) for name, depth in ids.items()}


# ---------------------------------------------------------------------------------------------------------------
# Freezing


def is_frozen_backbone(recipe) -> bool:
    return recipe.lora is None and recipe.train.freeze == "backbone"


def has_freeze_schedule(recipe) -> bool:
    """A schedule that unfreezes during the run (the set of trainable weights changes between epochs)."""
    freeze = recipe.train.freeze
    return not isinstance(freeze, str) and bool(freeze.head_warmup or freeze.unfreeze_every)


def trainable_depth(recipe, epoch: int, top: int) -> int | None:
    """Backbone layers at this depth and above train in this epoch (1-based); None: the whole backbone trains.

    top + 1 means the head alone.
    """
    freeze = recipe.train.freeze
    if recipe.lora is not None or freeze == "none":
        return None
    if freeze == "backbone":
        return top + 1
    if freeze.head_warmup:
        return top + 1 if epoch <= freeze.head_warmup else None
    if freeze.unfreeze_every:
        stage = (epoch - 1) // freeze.unfreeze_every  # epochs 1..K: head alone; then one more layer per K epochs
        depth = top + 1 - stage
        return None if depth <= 0 else depth
    return None


def apply_freeze(model: nn.Module, depth: int | None, ids: dict[str, int]) -> int:
    """Set requires_grad for the epoch; returns the number of trainable parameters (head included)."""
    trainable = 0
    for name, param in model.named_parameters():
        if name in ids:
            param.requires_grad_(depth is None or ids[name] >= depth)
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def freeze_modes(model: nn.Module) -> None:
    """After `model.train()`: modules whose every weight is frozen run in eval mode (BatchNorm statistics stay as
    pretrained, and a frozen backbone is the fixed feature extractor a linear probe assumes)."""
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params) and module.training:
            module.eval()


def freeze_word_embeddings(model: nn.Module) -> int:
    """Keep a transformers backbone's input (word) embeddings as pretrained; returns how many weights that froze."""
    base = plain_model(model)
    backbone = base.backbone if isinstance(base, TextClassifier) else base
    if not hasattr(backbone, "get_input_embeddings") or backbone.get_input_embeddings() is None:
        raise FinetuneError("train.freeze_embeddings: only text (transformers) backbones have word embeddings")
    weight = backbone.get_input_embeddings().weight
    weight.requires_grad_(False)
    return weight.numel()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' or timm's own switch for recomputing activations in the backward pass."""
    base = plain_model(model)
    inner = base.backbone if isinstance(base, (TextClassifier, VisionClassifier)) else base
    inner = inner.model if isinstance(inner, TimmClassifier) else inner
    if hasattr(inner, "gradient_checkpointing_enable"):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if is_lora(model):  # frozen embeddings output no grad: checkpointed layers need an input that has one
            inner.enable_input_require_grads()
    elif hasattr(inner, "set_grad_checkpointing"):
        inner.set_grad_checkpointing(True)
    else:
        raise FinetuneError(f"train.gradient_checkpointing: {type(inner).__name__} has no gradient checkpointing")


# ---------------------------------------------------------------------------------------------------------------
# Cached features of a frozen backbone


# Below this many multiply-adds per training step (batch x trainable weights), a step on cached features is a few
# tiny kernels: torch's intra-op threads cost more to wake and join than they share.
ONE_THREAD_WORK = 2**25


@contextlib.contextmanager
def threads_for_step(model: nn.Module, batch_size: int):
    """One intra-op thread while a small head trains on cached features (measured on 2 cores, bf16: 0.3 ms a step
    on one thread against 3 ms on two, 30x that when the cores are shared; the same numbers to the bit, as each op
    is too small to be split); torch's own setting for everything else."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not isinstance(model, CachedHead) or batch_size * trainable > ONE_THREAD_WORK or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class CachedHead(nn.Module):
    """The head alone, fed with the frozen backbone's cached features; `.model` is the whole model (for export)."""

    def __init__(self, model: nn.Module, head_fn):
        super().__init__()
        self.model = model
        self.head_fn = head_fn

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head_fn(self.model, features)


def feature_split(model: nn.Module, recipe):
    """(features_fn(model, batch), head_fn(model, features)) splitting the model where the frozen part ends,
    or None for a model whose head we cannot separate (then it trains through the frozen backbone)."""
    if isinstance(model, TextClassifier):
        def features(m, batch):
            outputs = m.backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                 **{k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")})
            return pool(outputs, batch.get("attention_mask"), m.pooling)
        return features, lambda m, f: m.head(f)
    if isinstance(model, VisionClassifier):
        def features(m, batch):
            return m.backbone.forward_head(m.backbone.forward_features(batch["pixel_values"]), pre_logits=True)
        return features, lambda m, f: m.head(f)
    if isinstance(model, TimmClassifier):
        rate = recipe.backbone.dropout or 0.0  # timm's drop_rate: the dropout in front of its classifier

        def features(m, batch):
            return m.model.forward_head(m.model.forward_features(batch["pixel_values"]), pre_logits=True)

        def head(m, f):
            return m.model.get_classifier()(F.dropout(f, rate, m.training))
        return features, head
    # transformers' BERT-style classes: classifier(dropout(pooler_output)); others differ, so no cache for them
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if (
        base is not None
        and isinstance(getattr(model, "classifier", None), nn.Linear)
        and isinstance(getattr(model, "dropout", None), nn.Dropout)
        and getattr(base, "pooler", None) is not None
    ):
        def features(m, batch):
            return getattr(m, m.base_model_prefix)(**batch).pooler_output
        return features, lambda m, f: m.classifier(m.dropout(f))
    return None


def cache_dir() -> Path:
    from finetune.caches import feature_cache_dir  # `finetune cache ls|clear` owns the path

    return feature_cache_dir()


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the frozen weights (not the head's): features depend on them alone."""
    head = head_parameter_names(model)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name not in head:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """What the features of a data set depend on: the tokenized ids (datasets' own fingerprint) or the images and
    their transform."""
    if hasattr(dataset, "_fingerprint"):
        return dataset._fingerprint
    digest = hashlib.sha256(repr(dataset.transform).encode())
    for image in dataset.images:
        if isinstance(image, (str, Path)):
            stat = Path(image).stat()
            digest.update(f"{image}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        elif isinstance(image, (bytes, bytearray)):
            digest.update(hashlib.sha256(image).digest())
        elif isinstance(image, dict) and isinstance(image.get("bytes"), (bytes, bytearray)):
            digest.update(hashlib.sha256(image["bytes"]).digest())
        else:
            digest.update(repr(image).encode())
    return digest.hexdigest()


@torch.no_grad()
def compute_features(model, features_fn, loader, device) -> torch.Tensor:
    """The frozen part in eval mode over a whole split, returned in row order whatever order the loader reads in."""
    was_training = model.training
    model.eval()
    chunks = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        chunks.append(features_fn(model, batch).float().cpu())
    model.train(was_training)
    computed = torch.cat(chunks)
    features = torch.empty_like(computed)
    features[torch.tensor(list(iter(loader.sampler)), dtype=torch.long)] = computed
    return features


def cached_features(model, features_fn, dataset, make_loader, key_parts: dict, device, say) -> torch.Tensor:
    """Features of one split from the disk cache, computed (and stored atomically) on a miss."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir() / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["features"]
        except Exception:  # a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    say(f"computing {key_parts['split']} features of the frozen backbone ({len(dataset)} examples; "
        f"cached in {path.parent})")
    with torch.random.fork_rng(devices=[]):  # the uncached path draws nothing here: neither may this one
        features = compute_features(model, features_fn, make_loader(dataset), device)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"features": features.contiguous()}, temporary)
    os.replace(temporary, path)
    return features


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features with the split's labels: {"features": vector, "labels": ...} per example."""

    def __init__(self, features: torch.Tensor, labels):
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return {"features": self.features[index], "labels": self.labels[index]}


def labels_of(dataset) -> list:
    """The labels of a tokenized (datasets) or image data set, in row order."""
    if hasattr(dataset, "column_names"):
        # a list, not datasets' lazy Column: a row read from Arrow per example costs seconds per epoch of a probe
        return dataset["labels" if "labels" in dataset.column_names else "label"][:]
    return list(dataset.labels)


def make_feature_loader(dataset: FeatureDataset, batch_size: int, shuffle: bool, seed: int, like, sampler=None):
    """Batches in the same order as `like`, the uncached path's loader for the split: same sampler and the same
    generator policy (a loader without its own generator draws its workers' seed from the global RNG, which then
    changes what dropout draws next)."""
    from torch.utils.data import DataLoader, RandomSampler

    own_order = isinstance(like.sampler, RandomSampler) and like.sampler.generator not in (None, like.generator)
    if shuffle and sampler is None and own_order:  # image loaders draw the order from a generator of its own
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))

    def collate(items):
        labels = [item["labels"] for item in items]
        first = labels[0]
        if isinstance(first, torch.Tensor):
            labels = torch.stack(labels)
        elif isinstance(first, float):
            labels = torch.tensor(labels, dtype=torch.float32)
        elif isinstance(first, (list, tuple)):
            labels = torch.tensor(labels, dtype=torch.float32)
        else:
            labels = torch.tensor(labels)
        return {"features": torch.stack([item["features"] for item in items]), "labels": labels}

    generator = torch.Generator().manual_seed(seed) if like.generator is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator, collate_fn=collate)
