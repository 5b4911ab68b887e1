"""Optimisation: AdamW param groups (no decay on biases, norms and what timm's no_weight_decay() names, a head lr)
and transformers' learning-rate schedules."""

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
    skip = no_weight_decay_names(model)
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights get no optimizer state
        level = top + 1 if name in head_names else (depths.get(name, top) if layer_decay and depths else -1)
        # biases, LayerNorm/BatchNorm weights, and position embeddings, class tokens, ... as the model itself says
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip
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


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that a submodule's own `no_weight_decay()` (timm's convention: ViT's pos_embed and
    cls_token, Swin's relative position tables, ...) keeps out of weight decay, wherever it sits in the model (inside
    the kit's wrapper or a peft model)."""
    found = set()
    parameters = dict(model.named_parameters())
    for prefix, module in model.named_modules():
        method = getattr(type(module), "no_weight_decay", None)
        if not callable(method):
            continue
        start = f"{prefix}." if prefix else ""
        for name in method(module):
            full = start + name
            # a name is a parameter, or a module (or prefix) whose parameters all count
            found |= {p for p in parameters if p == full or p.startswith(full + ".")}
    return found


def warmup_steps(warmup: int | float, total_steps: int) -> int:
    """A float below 1 is a fraction of all steps; an int is a step count."""
    return math.ceil(warmup * total_steps) if isinstance(warmup, float) else int(warmup)


# Schedules whose lr follows a metric fed to step(metric): the loop steps them after each evaluation with the
# validation's eval.select_best (as the transformers Trainer does with metric_for_best_model), not once per step.
METRIC_DRIVEN = {"reduce_lr_on_plateau", "greedy"}
# Arguments counted in optimizer steps: an int is steps, a float below 1 a fraction of all steps (as train.warmup).
STEP_ARGUMENTS = {"num_decay_steps", "num_stable_steps", "timescale"}
# finetune's `constant` has always warmed up (transformers' own `constant` ignores warmup)
ALIASES = {"constant": "constant_with_warmup"}


def scheduler_arguments(name: str) -> dict[str, object]:
    """The arguments transformers' schedule `name` takes beyond the optimizer, warmup and total steps, with their
    defaults (read from the installed transformers' own function, so a new argument needs no edit here)."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(ALIASES.get(name, name))]
    if name in METRIC_DRIVEN:  # transformers passes **kwargs on to the class: its own arguments are the ones
        from torch.optim.lr_scheduler import ReduceLROnPlateau
        from transformers.optimization import GreedyLR

        function = {"reduce_lr_on_plateau": ReduceLROnPlateau, "greedy": GreedyLR}[name].__init__
    given = {"self", "optimizer", "num_warmup_steps", "num_training_steps", "last_epoch", "verbose"}
    return {
        key: (None if p.default is inspect.Parameter.empty else p.default)
        for key, p in inspect.signature(function).parameters.items()
        if key not in given and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


def build_scheduler(optimizer, name: str, warmup: int, total_steps: int, args: dict | None = None,
                    step_scale: int = 1, mode: str = "min"):
    """transformers' `get_scheduler(name)` with train.scheduler_args; step_scale: how many times the scheduler is
    stepped per optimizer step (accelerate steps it once per process), applied to the arguments counted in steps.
    mode: a metric-driven schedule's direction (max for a metric where higher is better) unless the args say."""
    from transformers import get_scheduler

    from finetune.errors import FinetuneError

    args = dict(args or {})
    check_scheduler(name, args)
    if name in METRIC_DRIVEN:
        args.setdefault("mode", mode)
    for key in STEP_ARGUMENTS & set(args):
        value = args[key]
        args[key] = math.ceil(value * total_steps) if isinstance(value, float) else value * step_scale
    try:
        return get_scheduler(ALIASES.get(name, name), optimizer, num_warmup_steps=warmup,
                             num_training_steps=total_steps, scheduler_specific_kwargs=args)
    except (TypeError, ValueError) as error:  # e.g. both min_lr and min_lr_rate, or an unknown warmup_type
        raise FinetuneError(f"train.scheduler_args: {name}: {error}") from None


def check_scheduler(name: str, args: dict) -> None:
    """train.scheduler and train.scheduler_args, as far as they can be checked without an optimizer."""
    from finetune.errors import FinetuneError

    known = scheduler_arguments(name)
    for key in args:
        if key not in known:
            takes = ", ".join(known) or "no arguments"
            raise FinetuneError(
                f"train.scheduler_args.{key}: not an argument of the {name} schedule (it takes {takes})"
            )
    if name == "warmup_stable_decay" and args.get("num_decay_steps") is None:
        raise FinetuneError(
            "train.scheduler_args.num_decay_steps: warmup_stable_decay needs the length of its final decay, in steps "
            "or as a fraction of all steps, e.g. train.scheduler_args={num_decay_steps: 0.2}"
        )
    for key in STEP_ARGUMENTS & set(args):
        value = args[key]
        fraction = isinstance(value, float) and 0 <= value < 1
        if not fraction and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise FinetuneError(f"train.scheduler_args.{key}: expected steps (an integer) or a fraction in [0, 1), "
                                f"got {value!r}")
