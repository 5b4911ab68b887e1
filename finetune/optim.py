"""Optimisation: AdamW param groups (no decay on biases and norms, a head lr) and warmup schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_param_groups(model: nn.Module, lr: float, head_lr: float | None, weight_decay: float, head_names: set[str]):
    """Up to four groups (backbone/head x decay/no decay), each with its own `lr` written out."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights get no optimizer state
        is_head = name in head_names
        no_decay = param.ndim <= 1 or name.endswith(".bias")  # biases, LayerNorm/BatchNorm weights
        groups.setdefault((is_head, no_decay), []).append(param)
    return [
        {
            "params": params,
            "lr": (head_lr or lr) if is_head else lr,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{'head' if is_head else 'backbone'}{'_no_decay' if no_decay else ''}",
        }
        for (is_head, no_decay), params in sorted(groups.items())
    ]


def warmup_steps(warmup: int | float, total_steps: int) -> int:
    """A float below 1 is a fraction of all steps; an int is a step count."""
    return math.ceil(warmup * total_steps) if isinstance(warmup, float) else int(warmup)


def build_scheduler(optimizer, name: str, warmup: int, total_steps: int):
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    return get_scheduler(names[name], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
