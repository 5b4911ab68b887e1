"""Optimisation: AdamW param groups (no decay on biases and norms, a head lr) and warmup schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_param_groups(
    model: nn.Module,
    lr: float,
    head_lr: float | None,
    weight_decay: float,
    head_names: set[str],
    depths: dict[str, int] | None = None,
    layer_decay: float | None = None,
):
    """Groups by (head or backbone depth) x (decay or not), each with its own `lr` written out, so any scheduler
    (which scales every group's initial lr) honours them.

    With layer_decay, a backbone parameter at depth d (0: embeddings/stem, top: the last layer; see
    transfer.layer_ids) gets lr x layer_decay ** (top + 1 - d): the layer under the head gets lr x layer_decay.
    """
    top = max(depths.values(), default=0) if depths else 0
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights get no optimizer state
        level = top + 1 if name in head_names else (depths.get(name, top) if layer_decay and depths else -1)
        no_decay = param.ndim <= 1 or name.endswith(".bias")  # biases, LayerNorm/BatchNorm weights
        groups.setdefault((level, no_decay), []).append(param)
    result = []
    for (level, no_decay), params in sorted(groups.items()):
        is_head = level == top + 1
        if is_head:
            group_lr, label = head_lr or lr, "head"
        elif level < 0:
            group_lr, label = lr, "backbone"
        else:
            group_lr, label = lr * layer_decay ** (top + 1 - level), f"backbone_layer{level}"
        result.append({
            "params": params,
            "lr": group_lr,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{label}{'_no_decay' if no_decay else ''}",
        })
    return result


def warmup_steps(warmup: int | float, total_steps: int) -> int:
    """A float below 1 is a fraction of all steps; an int is a step count."""
    return math.ceil(warmup * total_steps) if isinstance(warmup, float) else int(warmup)


def build_scheduler(optimizer, name: str, warmup: int, total_steps: int):
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    return get_scheduler(names[name], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
