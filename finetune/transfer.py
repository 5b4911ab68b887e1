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
from torch import nn

from finetune.errors import FinetuneError
from finetune.model import ModelInterface, head_parameter_names, interface_of

# ---------------------------------------------------------------------------------------------------------------
# LoRA


def lora_target_modules(model: nn.Module, targets) -> list[str]:
    """The module names LoRA wraps: the recipe's list, or for `auto` what the model's interface says (peft's table
    for transformers backbones, ours for timm ones: finetune.model)."""
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
    return interface_of(model).lora_targets(head)


def _head_module_names(model: nn.Module) -> set[str]:
    """The smallest modules that own the head's parameters: what peft keeps trainable and saves in full."""
    head = head_parameter_names(model)
    owners = {name.rsplit(".", 1)[0] for name in head}
    return {o for o in owners if not any(o != other and o.startswith(other + ".") for other in owners)}


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


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Under LoRA, the model peft wraps (with its adapter layers in place); else the model itself."""
    return model.get_base_model() if is_lora(model) else model


def optimizer_head_names(model: nn.Module) -> set[str]:
    """Parameter names of the head in the model the optimizer sees (plain, LoRA-wrapped or cached-feature)."""
    if is_lora(model):
        return {name for name, _ in model.named_parameters() if "modules_to_save" in name}
    return head_parameter_names(model)


# ---------------------------------------------------------------------------------------------------------------
# Layer depths: layer-wise lr decay and staged unfreezing both count layers from the embeddings (0) upwards.


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """({backbone parameter name: depth}, top depth); head parameters are left out (they sit above the top).

    The depths are the model interface's (`layer_ids`: timm's group_matcher, or transformers' numbered layers),
    asked with the names as in the model under any LoRA adapters.
    """
    base = unwrap_lora(model)
    head = head_parameter_names(base) | {n for n, _ in model.named_parameters() if "modules_to_save" in n}
    names = [n for n, _ in model.named_parameters() if n not in head]
    prefix = _prefix_of(model, base)
    depths, top = interface_of(base).layer_ids([_strip_adapter(n[len(prefix):]) for n in names])
    return dict(zip(names, depths)), top


_ADAPTER_PART = re.compile(r"\.(?:base_layer|lora_[A-Za-z_]+\.[^.]+)(?=\.)")


def _strip_adapter(name: str) -> str:
    """A peft parameter's name as in the plain model: `x.lora_A.default.weight` and `x.base_layer.weight` ->
    `x.weight`."""
    return _ADAPTER_PART.sub("", name)


def _prefix_of(model: nn.Module, inner: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is inner:
            return f"{name}." if name else ""
    return ""


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
    embeddings = interface_of(unwrap_lora(model)).word_embeddings()
    if embeddings is None:
        raise FinetuneError("train.freeze_embeddings: only text (transformers) backbones have word embeddings")
    embeddings.weight.requires_grad_(False)
    return embeddings.weight.numel()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' or timm's own switch for recomputing activations in the backward pass (the model's)."""
    interface_of(unwrap_lora(model)).enable_gradient_checkpointing(lora=is_lora(model))


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
    on_features = interface_of(unwrap_lora(model)).on_features
    if not on_features or batch_size * trainable > ONE_THREAD_WORK or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class CachedHead(ModelInterface, nn.Module):
    """The head alone, fed with the frozen backbone's cached features; `.model` is the whole model (for export)."""

    on_features = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return interface_of(self.model).head_on_features(features)

    def library_model(self) -> nn.Module:
        return interface_of(self.model).library_model()

    def head_parameter_names(self) -> set[str]:
        return {f"model.{name}" for name in head_parameter_names(self.model)}

    def output_layer(self) -> nn.Module:
        return interface_of(self.model).output_layer()

    def model_to_save(self) -> nn.Module:
        return self.model


def feature_function(model: nn.Module):
    """features_fn(model, batch): the model's interface's `features`, what cached features are computed from; None
    for a model whose head cannot be separated from its backbone (then it trains through the frozen backbone)."""
    if not interface_of(model).separable_head():
        return None
    return lambda m, batch: interface_of(m).features(batch)


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
def compute_features(model, features_fn, loader, device, name: str = "features") -> torch.Tensor:
    """The frozen part in eval mode over a whole split, returned in row order whatever order the loader reads in."""
    from finetune.progress import pass_progress

    was_training = model.training
    model.eval()
    chunks = []
    for batch in pass_progress(loader, name, len(loader)):
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

    from finetune.caches import feature_cache_dir  # `finetune cache ls|clear` owns the path

    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
    path = feature_cache_dir() / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["features"]
        except Exception:  # a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    say(f"computing {key_parts['split']} features of the frozen backbone ({len(dataset)} examples; "
        f"cached in {path.parent})")
    with torch.random.fork_rng(devices=[]):  # the uncached path draws nothing here: neither may this one
        features = compute_features(model, features_fn, make_loader(dataset), device, f"{key_parts['split']} features")
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
