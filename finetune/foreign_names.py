"""Other tools' names for the recipe's keys: the transformers Trainer's TrainingArguments and timm's train.py flags
(dashes read as underscores), so that an unknown key that is one of them is answered with ours."""

from __future__ import annotations

TRAINER = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "warmup_ratio": "train.warmup (a fraction below 1)",
    "warmup_steps": "train.warmup (an integer: steps)",
    "weight_decay": "train.weight_decay",
    "lr_scheduler_type": "train.scheduler",
    "lr_scheduler_kwargs": "train.scheduler_args",
    "max_grad_norm": "train.max_grad_norm",
    "max_steps": "train.max_steps",
    "eval_steps": "train.eval_every",
    "save_steps": "train.checkpoint_every",
    "save_total_limit": "train.keep_checkpoints",
    "metric_for_best_model": "eval.select_best",
    "greater_is_better": "eval.lower_is_better (its opposite)",
    "load_best_model_at_end": "nothing: the best evaluation's weights are always the run's model/ (eval.select_best)",
    "bf16": "train.precision=bf16",
    "fp16": "train.precision=fp16",
    "max_seq_length": "data.max_length",
    "max_length": "data.max_length",
    "seed": "train.seed",
    "label_smoothing_factor": "train.label_smoothing",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "group_by_length": "train.group_by_length",
    "torch_compile": "train.compile",
    "dataloader_num_workers": "data.num_workers",
    "early_stopping_patience": "train.early_stopping.patience",
    "output_dir": "output.dir",
    "hub_model_id": "hub.repo_id",
    "hub_private_repo": "hub.private",
    "report_to": "train.log_with",
}

TIMM = {
    "lr": "train.lr",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "model": "backbone.name",
    "drop": "backbone.dropout",
    "drop_rate": "backbone.dropout",
    "drop_path": "backbone.drop_path",
    "drop_path_rate": "backbone.drop_path",
    "model_ema": "train.ema",
    "model_ema_decay": "train.ema.decay",
    "mixup": "augment.mixup",
    "cutmix": "augment.cutmix",
    "smoothing": "train.label_smoothing",
    "reprob": "augment.random_erasing",
    "hflip": "augment.hflip",
    "aa": "augment.auto_augment",
    "img_size": "data.image_size",
    "sched": "train.scheduler",
    "amp": "train.precision",
    "workers": "data.num_workers",
    "pretrained": "backbone.pretrained",
}

TOOLS = (("the Trainer's", TRAINER), ("timm's", TIMM))


def ours(name: str) -> str | None:
    """Our dotted key (with a word on its value where that differs) for another tool's `name`, or None."""
    name = str(name).replace("-", "_").lower()
    return next((table[name] for _, table in TOOLS if name in table), None)


def hint(key: str, section: str) -> str | None:
    """" (the Trainer's learning_rate: here it is train.lr)" for another tool's name of one of our keys; None when
    `key` is none, or is already the right key in `section` (`lr` under train is ours, at the top it is timm's)."""
    name = str(key).replace("-", "_").lower()
    for tool, table in TOOLS:
        if name in table and table[name].split(" ")[0].split("=")[0] != f"{section}.{name}".lstrip("."):
            return f" ({tool} {key}: here it is {table[name]})"
    return None
