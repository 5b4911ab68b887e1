"""The checks a recipe's types cannot express: every value, each problem named by its dotted key."""

from __future__ import annotations

import difflib

from finetune.errors import FinetuneError
from finetune.problems import PROBLEMS
from finetune.recipe_schema import Eval, Recipe


def _check_evaluate_modules(e: Eval, problems: list[str]) -> None:
    """The evaluate entries of eval: trusted, well formed, loadable now (not after an epoch of training); their
    arguments and directions declared to finetune.metrics."""
    from finetune.metrics import declare, evaluate_parts, is_evaluate, load_module

    entries = [name for name in e.metrics if is_evaluate(name)]
    for key, names in (("eval.metric_args", list(e.metric_args)), ("eval.lower_is_better", e.lower_is_better)):
        for name in names:
            if name not in entries:
                what = "an evaluate entry" if is_evaluate(name) else "for evaluate entries only ('evaluate:...')"
                problems.append(f"{key}: '{name}' is not {what} of eval.metrics; list it there first"
                                if is_evaluate(name) else f"{key}: '{name}' is {what}; built-in metrics know "
                                                          "their direction and take no arguments")
    for name, args in e.metric_args.items():
        if not isinstance(args, dict):
            problems.append(f"eval.metric_args.{name}: must be a mapping of compute() arguments, got {args!r}")
    if not entries:
        return
    if not e.trust_metric_code:
        problems.append(f"eval.metrics: '{entries[0]}' runs the module's own Python code through evaluate.load; "
                        "set eval.trust_metric_code=true if you trust it")
        return
    for name in entries:
        ref, key = evaluate_parts(name)
        if not ref or (key is None and "#" in name):
            problems.append(f"eval.metrics: '{name}' should be 'evaluate:<folder or hub id>' or "
                            "'evaluate:<folder or hub id>#<key>'")
            continue
        args = e.metric_args.get(name) if isinstance(e.metric_args.get(name), dict) else {}
        declare(name, args, higher=name not in e.lower_is_better)
        try:
            load_module(ref, args.get("config_name"))
        except FinetuneError as error:
            problems.append(str(error))


def check_values(recipe: Recipe, problems: list[str]) -> None:
    """Every value the schema's types cannot check, each problem appended to `problems` with its dotted key."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    from finetune import contrastive, data  # the few-label keys' owners check them

    for check in (_check_training, _check_data, _check_model, _check_steps, _check_task, _check_distill,
                  data.check_per_class, contrastive.check_recipe):
        check(recipe, need)
    _check_metrics(recipe, problems, need)


def _check_training(recipe: Recipe, need) -> None:
    """train.*: sizes, rates and the warm-up."""
    t = recipe.train
    need(t.epochs >= 1, f"train.epochs: must be at least 1, got {t.epochs}")
    need(t.batch_size >= 1, f"train.batch_size: must be at least 1, got {t.batch_size}")
    need(t.eval_batch_size is None or t.eval_batch_size >= 1, "train.eval_batch_size: must be at least 1")
    need(t.lr > 0, f"train.lr: must be > 0, got {t.lr}")
    need(t.head_lr is None or t.head_lr > 0, f"train.head_lr: must be > 0, got {t.head_lr}")
    need(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    need(t.grad_accum >= 1, f"train.grad_accum: must be at least 1, got {t.grad_accum}")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm: must be > 0, or null for no clipping")
    if isinstance(t.warmup, float):
        need(0 <= t.warmup < 1, f"train.warmup: a fraction must be in [0, 1), got {t.warmup}; an integer means steps")
    else:
        need(t.warmup >= 0, f"train.warmup: steps must be >= 0, got {t.warmup}")


def _check_data(recipe: Recipe, need) -> None:
    """data.* and augment.*, label smoothing, EMA and the loader's workers."""
    t, d = recipe.train, recipe.data
    need(0 < d.val_fraction < 1, f"data.val_fraction: must be between 0 and 1, got {d.val_fraction}")
    need(d.max_samples is None or d.max_samples >= 1, "data.max_samples: must be at least 1, or null for all rows")
    need(d.max_length >= 2, f"data.max_length: must be at least 2, got {d.max_length}")
    need(d.image_size is None or d.image_size >= 1, "data.image_size: must be at least 1, or null")
    a = recipe.augment
    need(
        len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1] <= 1,
        f"augment.scale: expected [min, max] area fractions with 0 < min <= max <= 1, got {a.scale}",
    )
    for key in ("hflip", "random_erasing"):
        need(0 <= getattr(a, key) <= 1, f"augment.{key}: a probability must be in [0, 1], got {getattr(a, key)}")
    need(a.mixup >= 0 and a.cutmix >= 0, "augment.mixup/cutmix: alphas must be >= 0 (0 turns them off)")
    need(0 <= t.label_smoothing < 1, f"train.label_smoothing: must be in [0, 1), got {t.label_smoothing}")
    need(t.ema is None or 0 < t.ema.decay < 1, "train.ema.decay: must be between 0 and 1")
    need(d.num_workers is None or d.num_workers >= 0, "data.num_workers: must be >= 0, or null for automatic")


def _check_model(recipe: Recipe, need) -> None:
    """backbone.*, head.*, lora.* and train.freeze."""
    t, h = recipe.train, recipe.head
    need(recipe.backbone.dropout is None or 0 <= recipe.backbone.dropout < 1, "backbone.dropout: must be in [0, 1)")
    need(0 <= recipe.backbone.drop_path < 1, "backbone.drop_path: must be in [0, 1)")
    need(0 <= h.dropout < 1, f"head.dropout: must be in [0, 1), got {h.dropout}")
    need(all(w is not None and w >= 1 for w in h.hidden), "head.hidden: layer widths must be positive integers")
    need(h.type == "mlp" or not h.hidden, "head.hidden: only an mlp head has hidden layers; set head.type=mlp")
    need(0 < h.threshold < 1, f"head.threshold: must be between 0 and 1, got {h.threshold}")
    if recipe.lora is not None:
        need(recipe.lora.r >= 1, f"lora.r: must be at least 1, got {recipe.lora.r}")
        need(0 <= recipe.lora.dropout < 1, "lora.dropout: must be in [0, 1)")
        need(recipe.lora.alpha > 0, f"lora.alpha: must be > 0, got {recipe.lora.alpha}")
        need(recipe.lora.target_modules != [], "lora.target_modules: name at least one module, or use auto")
        need(t.freeze == "none", "train.freeze: LoRA already freezes the backbone; set train.freeze=none with lora")
    if not isinstance(t.freeze, str):  # a Freeze schedule, not "none"/"backbone"
        need(t.freeze.head_warmup >= 0, f"train.freeze.head_warmup: must be >= 0 epochs, got {t.freeze.head_warmup}")
        need(
            t.freeze.unfreeze_every is None or t.freeze.unfreeze_every >= 1,
            f"train.freeze.unfreeze_every: must be at least 1 epoch, got {t.freeze.unfreeze_every}",
        )
        need(
            not (t.freeze.head_warmup and t.freeze.unfreeze_every),
            "train.freeze: head_warmup and unfreeze_every are two schedules; pick one",
        )


def _check_steps(recipe: Recipe, need) -> None:
    """train.*'s step counts, orders, class weights, layer decay and cached features."""
    t, h = recipe.train, recipe.head
    need(t.max_steps is None or t.max_steps >= 1,
         f"train.max_steps: must be at least 1 step, or null; got {t.max_steps}")
    need(t.eval_every is None or t.eval_every >= 1,
         f"train.eval_every: must be at least 1 step, or null (after each epoch); got {t.eval_every}")
    need(t.checkpoint_every is None or t.checkpoint_every >= 1,
         "train.checkpoint_every: must be at least 1 step, or null")
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints: must be at least 1, got {t.keep_checkpoints}")
    need(t.sampler == "random" or PROBLEMS[h.problem].single_class, "train.sampler: balanced is for single_label heads")
    need(
        not (t.group_by_length and t.sampler == "balanced"),
        "train.group_by_length: and train.sampler=balanced are two orders; pick one",
    )
    if t.class_weights is not None:
        need(PROBLEMS[h.problem].single_class, "train.class_weights: only for head.problem=single_label")
        need(
            t.class_weights == "auto" or all(w is not None and w > 0 for w in t.class_weights),
            "train.class_weights: weights must be positive numbers (one per label, in label order), or auto",
        )
    need(t.layer_decay is None or 0 < t.layer_decay <= 1, f"train.layer_decay: must be in (0, 1], got {t.layer_decay}")
    need(
        not (t.cache_features and t.freeze != "backbone"),
        "train.cache_features: needs a frozen backbone; set train.freeze=backbone (or cache_features=null)",
    )


def _check_task(recipe: Recipe, need) -> None:
    """head.problem and the keys the recipe's task constrains."""
    from finetune.tasks import TASKS, get_task

    h = recipe.head
    if recipe.task in TASKS:  # a bad task name is its own problem, reported already
        task = get_task(recipe.task)
        need(h.problem in task.problems, f"head.problem: {recipe.task} takes {' or '.join(task.problems)}, "
                                          f"not {h.problem}")
        task.check_recipe(recipe, need)


def _check_distill(recipe: Recipe, need) -> None:
    layers, d = recipe.backbone.layers, recipe.distill  # the teacher itself: `validate` and `run` (finetune.distill)
    need(layers is None or layers >= 1, f"backbone.layers: must be at least 1, or null for all; got {layers}")
    need(d is None or d.temperature > 0, "distill.temperature: must be > 0")
    need(d is None or 0 <= d.alpha <= 1, "distill.alpha: must be in [0, 1]")


def _check_metrics(recipe: Recipe, problems: list[str], need) -> None:
    """eval.metrics for the problem, and what selects or stops on them (eval, early stopping, sweep)."""
    from finetune.metrics import METRICS, is_evaluate, metrics_for  # metrics owns the names; recipe checks them

    t, h = recipe.train, recipe.head
    allowed = metrics_for(h.problem)
    _check_evaluate_modules(recipe.eval, problems)
    for name in recipe.eval.metrics:
        if is_evaluate(name):
            continue
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            kind = "not a metric for" if name in METRICS else "unknown metric for"
            problems.append(f"eval.metrics: '{name}' is {kind} head.problem={h.problem}{hint}; "
                            f"use {', '.join(allowed)}")
    selectable = [*recipe.eval.metrics, "loss"]
    need(
        recipe.eval.select_best in selectable,
        f"eval.select_best: '{recipe.eval.select_best}' is not in eval.metrics; use one of {', '.join(selectable)}",
    )
    if t.early_stopping is not None:
        need(
            t.early_stopping.metric in selectable,
            f"train.early_stopping.metric: '{t.early_stopping.metric}' is not in eval.metrics; use one of "
            + ", ".join(selectable),
        )
        need(t.early_stopping.patience >= 1, "train.early_stopping.patience: must be at least 1")
    if recipe.sweep is not None:
        s = recipe.sweep
        need(
            s.metric is None or s.metric in selectable,
            f"sweep.metric: '{s.metric}' is not in eval.metrics; use one of {', '.join(selectable)}",
        )
        need(s.trials >= 1, f"sweep.trials: must be at least 1, got {s.trials}")
        need(s.startup_trials >= 0, f"sweep.startup_trials: must be >= 0, got {s.startup_trials}")
        need(s.min_epochs is None or s.min_epochs >= 1, f"sweep.min_epochs: must be >= 1 or null, got {s.min_epochs}")
