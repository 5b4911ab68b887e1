#!/usr/bin/env python
"""Benchmark the kit against a plain timm + torch training loop on the same image-classification job.

    python scripts/bench_vision.py RECIPE [key=value ...] [--kit-only | --baseline-only] [--compare-scratch]
                                   [--out results.json] [--threads N] [--repeat N] [--baseline-fused]
                                   [--baseline-scheduler timm|transformers]
                                   [--workdir DIR] [--keep] [--verbose]

Both sides run in their own child process of this same Python, with the same torch thread count
(OMP_NUM_THREADS / MKL_NUM_THREADS and torch.set_num_threads), so that wall time and peak memory compare:

  kit       `python -m finetune run RECIPE key=value ... output.dir=WORKDIR/kit`; metrics.json and split.json are read
            back, and the exported model/ is scored again here on the test rows with timm alone
            (`timm.create_model("local-dir:...", pretrained=True)` + `create_transform(**resolve_model_data_config(m))`),
            a check that what was shipped is what metrics.json measured.
  baseline  this script in worker mode: the loop a timm user writes (what timm's train.py does at its core, without
            Accelerate): the same recipe and overrides through `finetune.recipe.load_recipe` +
            `finetune.images.load_image_splits` (deterministic: the same rows as the kit run, checked against its
            split.json); the same backbone from `finetune.model.build_vision_model` (so zoo weights and timm names
            resolve identically), of which the inner timm model is trained; timm's own transforms
            (`finetune.images.build_transforms` = `timm.data.create_transform` with the model's data config) at the
            same image size; a torch DataLoader with the same batch size, num_workers and seeded shuffling;
            `timm.optim.create_optimizer_v2(model, "adamw", lr, weight_decay)` (torch AdamW; no decay on biases and
            norms through timm's param_groups_weight_decay); timm.scheduler's CosineLRScheduler stepped per update
            (t_in_epochs=False, warmup_prefix=True, warmup_lr_init=0, lr_min=0: the same curve as the kit's
            transformers get_cosine_schedule_with_warmup, warmup steps counted as the kit counts them; linear is
            PolyLRScheduler(power=1), constant StepLRScheduler(decay_rate=1); --baseline-scheduler transformers
            uses transformers' get_scheduler instead, the kit's own); timm's LabelSmoothingCrossEntropy (or
            Mixup + SoftTargetCrossEntropy); clip_grad_norm_; timm's ModelEmaV3 with decay warmup when the recipe
            sets train.ema (as the kit; train.py's --model-ema --model-ema-warmup);
            the same seed (timm.utils.random_seed), precision and channels_last choice; evaluation every epoch,
            keeping the best epoch on eval.select_best (raw or EMA weights, by the kit's own rule), then the test
            split and a timm export (save_for_hf) with the best weights.
            Not matched on purpose: timm's train.py has no head learning rate, so train.lr is used for every
            parameter even when the recipe sets train.head_lr (a note says so); the optimizer is timm's default
            torch AdamW (on CPU torch's per-tensor loop), while the kit builds it with fused=True; --baseline-fused
            gives the baseline the fused kernel too.

Speed: "train images/s" is training images over the time spent in the training loop only, on both sides: the kit's
metrics.json `train.samples_per_second`, and for the baseline the same span (from asking the DataLoader for the first
batch to the last optimizer step of each epoch: data loading, forward, backward, optimizer, scheduler, EMA; the
per-epoch evaluation and checkpoint saving come after and are excluded). Wall seconds are each child process's whole
life (imports, data, model, training, evaluation, test, export). Peak memory is the GPU's max allocated memory, or
on CPU the main process's peak resident set (ru_maxrss; DataLoader workers not counted), on both sides.

Timings on a shared machine swing several-fold with other processes' load (2 cores here). Each run records the CPU
seconds of its process tree and how many threads other processes kept runnable meanwhile ("other processes'
runnable threads"); above ~0.5 the speed numbers say more about the neighbours than about the code, and a note says
so. --repeat N runs each side N times, alternating which goes first, and reports the best speed of each.

--compare-scratch runs the whole comparison twice, as given and with backbone.pretrained=false (the from-scratch
baseline), and prints pretrained vs scratch test accuracy side by side: the transfer-learning check.

Test accuracy and f1_macro are computed with scikit-learn on argmax predictions of the best epoch's model.
The last line printed is the whole result as one JSON object; --out also writes it (indented) to a file.
Only single-label image-classification recipes are supported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER_FLAG = "--_baseline-worker"


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers (as in bench_text.py)


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


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_job(recipe_arg: str, overrides: list[str]):
    from finetune.images import load_image_splits
    from finetune.recipe import find_recipe, load_recipe

    recipe = load_recipe(find_recipe(recipe_arg), overrides)
    check_recipe(recipe)
    return recipe, load_image_splits(recipe)


def check_recipe(recipe) -> None:
    if recipe.task != "image-classification" or recipe.head.problem != "single_label":
        raise SystemExit("bench_vision: only image-classification recipes with head.problem=single_label are supported")


def steps_like_kit(recipe, n_batches: int) -> tuple[int, int]:
    """(warmup steps, total optimizer steps) exactly as finetune.train computes them for one process."""
    from finetune.optim import warmup_steps

    t = recipe.train
    total = math.ceil(n_batches / t.grad_accum) * t.epochs
    return warmup_steps(t.warmup, total), total


def channels_last_like_kit(recipe, model, device_type: str) -> bool:
    """The kit's rule (finetune.train._use_channels_last): the recipe's value, else on for CNNs on GPUs."""
    import torch

    if recipe.train.channels_last is not None:
        return recipe.train.channels_last
    return device_type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


class PlainImages:
    """What a user writes around in-memory images: decode to RGB, apply the transform, return (tensor, label)."""

    def __init__(self, table: dict, transform):
        self.images, self.labels, self.transform = table["image"], table["label"], transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from finetune.images import load_image  # PIL .convert("RGB"), as timm's own loaders do

        return self.transform(load_image(self.images[index])), self.labels[index]


# ---------------------------------------------------------------------------------------------------------------
# The baseline side (runs in a child process: `bench_vision.py --_baseline-worker RESULT.json THREADS FUSED RECIPE ...`)


def baseline_worker(result_path: str, recipe_arg: str, overrides: list[str], threads: int, fused: bool,
                    scheduler_impl: str) -> None:
    start = time.perf_counter()
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
    from finetune.recipe import find_recipe, load_recipe
    from finetune.train import choose_precision

    set_threads(threads)
    recipe = load_recipe(find_recipe(recipe_arg), overrides)
    check_recipe(recipe)
    t, d, a = recipe.train, recipe.data, recipe.augment
    random_seed(t.seed)  # before the data and the head are made, as the kit's accelerate.set_seed
    splits = load_image_splits(recipe)
    names = splits.label_names
    out = Path(result_path).parent / "baseline"
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

    kwargs = {"fused": True} if fused else {}
    optimizer = create_optimizer_v2(model, "adamw", lr=t.lr, weight_decay=t.weight_decay, **kwargs)
    warmup, total_steps = steps_like_kit(recipe, len(train_loader))
    sched_args = dict(warmup_t=warmup, warmup_prefix=True, warmup_lr_init=0.0, lr_min=0.0, t_in_epochs=False)
    decay_steps = max(1, total_steps - warmup)
    if scheduler_impl == "transformers":  # the kit's own (finetune.optim.build_scheduler), for a bitwise check
        from transformers import get_scheduler

        names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
        scheduler = get_scheduler(names[t.scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
        scheduler.step_update = lambda num_updates: scheduler.step()
        scheduler_name = f"transformers get_scheduler({names[t.scheduler]})"
    elif t.scheduler == "cosine":
        scheduler = CosineLRScheduler(optimizer, t_initial=decay_steps, **sched_args)
    elif t.scheduler == "linear":
        scheduler = PolyLRScheduler(optimizer, t_initial=decay_steps, power=1.0, **sched_args)
    else:
        scheduler = StepLRScheduler(optimizer, decay_t=10**9, decay_rate=1.0,
                                    **{k: v for k, v in sched_args.items() if k != "lr_min"})
    if scheduler_impl != "transformers":
        scheduler_name = f"timm {type(scheduler).__name__}"
    # decay warmup as the kit's (finetune/train.py, use_warmup=True): timm train.py's --model-ema-warmup
    ema = ModelEmaV3(model, decay=t.ema.decay, use_warmup=True) if t.ema is not None else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def forward(x):
        if amp_dtype is None:
            return model(x)
        with torch.autocast(device.type, dtype=amp_dtype):
            return model(x)

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
            if amp_dtype is None:
                out_ = module(x)
            else:
                with torch.autocast(device.type, dtype=amp_dtype):
                    out_ = module(x)
            logits.append(out_.float().cpu())
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
            loss = criterion(forward(x).float(), target)
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
        entry = {"epoch": epoch, "loss": float(total_loss / max(batches, 1)), "validation": validation,
                 "images_per_second": samples / seconds if seconds else 0.0}
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
              + " ".join(f"{k} {v:.4f}" for k, v in validation.items())
              + (" | ema " + " ".join(f"{k} {v:.4f}" for k, v in entry["validation_ema"].items()) if ema else "")
              + f" | {entry['images_per_second']:.1f} images/s", flush=True)
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
    peak = peak_memory_mb()
    model.load_state_dict(load_file(str(out / "best.safetensors")))
    test = None
    if test_loader is not None:
        _, predictions, truth = validate(model, test_loader)
        test = sk_scores(truth, predictions)
    if native:  # the kit exports a timm folder too: the same work in the wall time
        save_for_hf(model, out / "model", model_config={"label_names": list(names)}, safe_serialization=True,
                    data_config=data_config)
    if t.label_smoothing > 0 and mixup is None:
        notes.append(
            "label smoothing: the baseline uses timm's LabelSmoothingCrossEntropy (as timm's train.py), the kit "
            "torch's cross_entropy(label_smoothing=): the same loss, rounded differently, so the two runs drift apart "
            "in the last digits after a few dozen steps (train.label_smoothing=0 gives bit-identical runs with "
            "--baseline-fused)"
        )
    if t.head_lr is not None and t.head_lr != t.lr:
        notes.append(
            f"the kit trains the head at train.head_lr={t.head_lr} and the backbone at {t.lr}; timm's train.py has no "
            f"head lr and the baseline uses {t.lr} for everything (pass train.head_lr=null for a like-for-like optimizer)"
        )
    if ema is None:
        best.pop("ema")
    result = {
        "rows": {key: (splits.info["splits"][key]["rows"] if key in splits.info["splits"] else None)
                 for key in ("train", "validation", "test")},
        "labels": names,
        "n": {"train": len(splits.train["label"]), "validation": len(splits.validation["label"]),
              "test": len(splits.test["label"]) if splits.test is not None else 0},
        "warmup_steps": warmup,
        "total_steps": total_steps,
        "precision": {"no": "fp32"}.get(precision, precision),
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}"
                     f"(fused={optimizer.defaults.get('fused')}, foreach={optimizer.defaults.get('foreach')})",
        "scheduler": scheduler_name,
        "num_workers": num_workers,
        "channels_last": channels_last,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "eval_transform": repr(eval_tf),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "baseline": {
            "test": test,
            "train_samples_per_second": train_samples / train_seconds if train_seconds else 0.0,
            "train_seconds": train_seconds,
            "train_samples": train_samples,
            "epochs_run": len(history),
            "best_epoch": best["epoch"],
            "best": best,
            "epochs": history,
            "peak_memory_mb": peak,
            "seconds_in_worker": time.perf_counter() - start,
            "notes": notes,
        },
    }
    Path(result_path).write_text(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Running the sides


def run_child(command: list[str], env: dict, log: Path, verbose: bool) -> dict:
    """Run one side; its exit code, wall seconds, CPU seconds (user+sys, it and its children) and the load around it."""
    import threading

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
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
    if verbose:
        process = subprocess.run(command, env=env)
    else:
        with log.open("w") as handle:
            process = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"code": process.returncode, "wall_seconds": wall, "cpu_seconds": cpu,
            "load_before": load_before, "load_after": os.getloadavg()[0],
            # mean runnable threads on the machine while it ran, less the sampler (1) and the child's own mean use
            # (its CPU seconds over wall seconds): roughly what other processes wanted of the CPUs meanwhile
            "other_runnable_threads": max(0.0, sum(samples) / len(samples) - 1 - cpu / wall) if samples else None}


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def rescore_kit_model(model_dir: Path, test_table: dict, batch_size: int) -> dict:
    """Score the exported model/ on the test rows with timm alone: does what was shipped match metrics.json?"""
    import numpy as np
    import timm
    import torch
    from timm.data import create_transform, resolve_model_data_config

    from finetune.images import load_image

    if (model_dir / "finetune.json").is_file():  # the kit's own format (an mlp head): timm cannot load it alone
        from finetune.model import load

        model, transform, _ = load(model_dir)
        call, labels, how = (lambda x: model(pixel_values=x)), None, "finetune.model.load (kit format)"
        data_config = None
    else:
        model = timm.create_model(f"local-dir:{model_dir.resolve()}", pretrained=True).eval()
        data_config = resolve_model_data_config(model)
        transform = create_transform(**data_config)
        call, labels, how = model, model.pretrained_cfg.get("label_names"), "timm local-dir + create_transform"
    predictions = []
    images = test_table["image"]
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.stack([transform(load_image(entry)) for entry in images[i:i + batch_size]])
            predictions.append(call(x).float().argmax(-1).numpy())
    scores = sk_scores(np.asarray(test_table["label"]), np.concatenate(predictions))
    return scores | {
        "how": how,
        "label_names": labels,
        "transform": repr(transform),
        "data_config": None if data_config is None else
        {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
    }


SPEED_KEYS = ("train_samples_per_second", "train_seconds", "wall_seconds", "cpu_seconds", "load_before", "load_after",
              "other_runnable_threads")


def bench(args, recipe_arg: str, overrides: list[str], workdir: Path, threads: int, tag: str) -> dict | None:
    """One comparison (the kit and/or the baseline, --repeat times each) on one set of overrides."""
    env = child_env(threads)
    notes: list[str] = []
    result: dict = {"recipe": recipe_arg, "overrides": overrides, "kit": None, "baseline": None, "notes": notes}
    from finetune.recipe import find_recipe, load_recipe

    recipe = load_recipe(find_recipe(recipe_arg), overrides)  # fail fast on a bad recipe, before any training
    check_recipe(recipe)
    t = recipe.train
    workdir.mkdir(parents=True, exist_ok=True)
    kit_dir = workdir / "kit"
    label = f"[{tag}] " if tag else ""

    def run_kit(i: int) -> dict | None:
        shutil.rmtree(kit_dir, ignore_errors=True)
        command = [sys.executable, "-m", "finetune", "run", recipe_arg, *overrides, f"output.dir={kit_dir}"]
        log = workdir / f"kit{i}.log"
        print(f"{label}kit: {' '.join(command[2:])}  (log {log})", file=sys.stderr, flush=True)
        run = run_child(command, env, log, args.verbose)
        if run["code"] != 0:
            print(f"bench_vision: the kit run failed (exit {run['code']}):\n{tail(log)}", file=sys.stderr)
            return None
        metrics = json.loads((kit_dir / "metrics.json").read_text())
        print(f"{label}kit: done in {run['wall_seconds']:.0f}s", file=sys.stderr, flush=True)
        return {
            "test": {k: metrics["test"][k] for k in ("accuracy", "f1_macro") if k in metrics.get("test", {})} or None,
            "train_samples_per_second": metrics["train"]["samples_per_second"],
            "train_seconds": metrics["train"]["seconds"],
            "train_samples": metrics["train"]["samples"],
            "best_epoch": metrics["best"]["epoch"],
            "best": metrics["best"],
            "epochs": metrics["epochs"],
            "peak_memory_mb": metrics["train"]["peak_memory_mb"],
            **{k: v for k, v in run.items() if k != "code"},
        }

    def run_baseline(i: int) -> dict | None:
        result_path = workdir / "baseline.json"
        command = [sys.executable, os.path.abspath(__file__), WORKER_FLAG, str(result_path), str(threads),
                   "1" if args.baseline_fused else "", args.baseline_scheduler, recipe_arg, *overrides]
        log = workdir / f"baseline{i}.log"
        print(f"{label}baseline: worker process  (log {log})", file=sys.stderr, flush=True)
        run = run_child(command, env, log, args.verbose)
        if run["code"] != 0:
            print(f"bench_vision: the baseline run failed (exit {run['code']}):\n{tail(log)}", file=sys.stderr)
            return None
        print(f"{label}baseline: done in {run['wall_seconds']:.0f}s", file=sys.stderr, flush=True)
        return json.loads(result_path.read_text()) | {k: v for k, v in run.items() if k != "code"}

    # alternate the order on each repeat, so that a change in the machine's load hits both sides alike
    sides = [] if args.baseline_only else ["kit"]
    sides += [] if args.kit_only else ["baseline"]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(args.repeat):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            got = run_kit(i) if side == "kit" else run_baseline(i)
            if got is None:
                return None
            runs[side].append(got)
    split = json.loads((kit_dir / "split.json").read_text()) if "kit" in runs else None
    job = None
    if "kit" in runs:
        result["kit"] = runs["kit"][0] | {"runs": [{k: r[k] for k in SPEED_KEYS} for r in runs["kit"]]}
    if "baseline" in runs:
        job = runs["baseline"][0]
        result["baseline"] = job.pop("baseline") | {k: job.pop(k) for k in list(job) if k in SPEED_KEYS}
        for r in runs["baseline"][1:]:
            r.update(r.pop("baseline"))
        result["baseline"]["runs"] = [{k: result["baseline"][k] for k in SPEED_KEYS}] + [
            {k: r[k] for k in SPEED_KEYS} for r in runs["baseline"][1:]]
        notes.extend(result["baseline"].pop("notes"))
        for r in runs["baseline"][1:]:
            if r["test"] != result["baseline"]["test"]:
                notes.append(f"the baseline's test scores differ between repeats ({r['test']} vs "
                             f"{result['baseline']['test']}): the loop is not bitwise deterministic here")
                break
    for r in runs.get("kit", [])[1:]:
        if r["test"] != result["kit"]["test"]:
            notes.append(f"the kit's test scores differ between repeats ({r['test']} vs {result['kit']['test']})")
            break
    for side in ("kit", "baseline"):
        if result[side] is not None and len(result[side]["runs"]) > 1:  # best of N: the least disturbed run
            best = max(result[side]["runs"], key=lambda r: r["train_samples_per_second"])
            result[side].update({k: best[k] for k in ("train_samples_per_second", "train_seconds", "other_runnable_threads")})
            result[side]["wall_seconds"] = min(r["wall_seconds"] for r in result[side]["runs"])
            result[side]["cpu_seconds"] = min(r["cpu_seconds"] for r in result[side]["runs"])
    if args.repeat > 1:
        notes.append(f"speed, wall and CPU seconds are the best of {args.repeat} runs per side (order alternated); "
                     "accuracy is from the first run")

    # the same rows on both sides, and the kit's exported model scored here with timm alone
    import torch

    torch.set_num_threads(threads)
    from finetune.images import load_image_splits
    from finetune.train import choose_precision

    splits = load_image_splits(recipe)
    if result["kit"] is not None:
        for key in ("train", "validation", "test"):
            ours = splits.info["splits"].get(key, {}).get("rows")
            theirs = split["splits"].get(key, {}).get("rows")
            if ours != theirs:
                raise SystemExit(f"bench_vision: the {key} rows differ from the kit's split.json; not the same job")
        if split["labels"] != splits.label_names:
            raise SystemExit("bench_vision: the label order differs from the kit's split.json")
        if job is not None and job["rows"] != {k: splits.info["splits"].get(k, {}).get("rows") for k in job["rows"]}:
            raise SystemExit("bench_vision: the baseline worker's rows differ from the kit's; not the same job")
        notes.append("train/validation/test rows and label order checked identical to the kit's split.json")
        if splits.test is not None and (kit_dir / "model").is_dir():
            rescored = rescore_kit_model(kit_dir / "model", splits.test, t.eval_batch_size or 2 * t.batch_size)
            result["kit"]["test_rescored"] = rescored
            kit_test = result["kit"]["test"] or {}
            if "accuracy" in kit_test:
                matches = all(abs(rescored[k] - kit_test[k]) < 1e-9 for k in ("accuracy", "f1_macro") if k in kit_test)
                rescored["matches_metrics_json"] = matches
                if not matches:
                    notes.append(
                        f"the kit's exported model/, loaded by timm with timm's eval transform, scores test accuracy "
                        f"{rescored['accuracy']:.4f} where metrics.json says {kit_test['accuracy']:.4f}: what is "
                        "shipped does not compute what was measured"
                    )
            if rescored["label_names"] is not None and rescored["label_names"] != splits.label_names:
                notes.append("the exported model/'s label_names differ from the split's label order")
            if job is not None and rescored["transform"] != job["eval_transform"]:
                notes.append("timm's eval transform for the exported model/ differs from the one used in training "
                             f"and evaluation:\n  exported: {rescored['transform']}\n  trained:  {job['eval_transform']}")
    warmup, total = None, None
    if job is not None:
        warmup, total = job["warmup_steps"], job["total_steps"]
    else:
        drop = recipe.augment.mixup > 0 or recipe.augment.cutmix > 0
        n = len(splits.train["label"])
        warmup, total = steps_like_kit(recipe, n // t.batch_size if drop else math.ceil(n / t.batch_size))
    result["job"] = {
        "n": {k: len(v["label"]) if v is not None else 0 for k, v in
              (("train", splits.train), ("validation", splits.validation), ("test", splits.test))},
        "image_size": recipe.data.image_size,
        "batch_size": t.batch_size,
        "eval_batch_size": t.eval_batch_size or 2 * t.batch_size,
        "epochs": t.epochs,
        "lr": t.lr,
        "head_lr": t.head_lr,
        "weight_decay": t.weight_decay,
        "scheduler": t.scheduler,
        "warmup_steps": warmup,
        "total_steps": total,
        "grad_accum": t.grad_accum,
        "max_grad_norm": t.max_grad_norm,
        "label_smoothing": t.label_smoothing,
        "ema": t.ema.decay if t.ema is not None else None,
        "augment": {k: getattr(recipe.augment, k) for k in ("scale", "hflip", "auto_augment", "random_erasing",
                                                            "mixup", "cutmix")},
        "backbone": recipe.backbone.name,
        "pretrained": recipe.backbone.pretrained,
        "seed": t.seed,
        "precision": {"no": "fp32"}.get(choose_precision(t.precision), choose_precision(t.precision)),
        "threads": threads,
        "num_workers": job["num_workers"] if job else (  # the kit's default (finetune.images.make_image_loader)
            recipe.data.num_workers if recipe.data.num_workers is not None else min(4, os.cpu_count() or 1)),
        "device": job["device"] if job else ("cuda" if torch.cuda.is_available() else "cpu"),
        "baseline_optimizer": job["optimizer"] if job else None,
        "baseline_scheduler": job["scheduler"] if job else None,
        "data_config": job["data_config"] if job else None,
    }
    if job and "fused=True" not in job["optimizer"]:
        notes.append(
            f"the baseline's optimizer is timm's default {job['optimizer']}; the kit builds torch.optim.AdamW with "
            "fused=True (finetune/train.py); pass --baseline-fused for the same kernel on both sides"
        )
    if result["kit"] and result["baseline"] and result["baseline"]["train_samples_per_second"]:
        result["speed_ratio"] = result["kit"]["train_samples_per_second"] / result["baseline"]["train_samples_per_second"]
        result["wall_ratio"] = result["kit"]["wall_seconds"] / result["baseline"]["wall_seconds"]
    else:
        result["speed_ratio"] = result["wall_ratio"] = None
    busy = [result[side]["other_runnable_threads"] for side in ("kit", "baseline")  # of the runs whose speed is shown
            if result[side] and result[side].get("other_runnable_threads") is not None]
    result["other_runnable_threads_max"] = max(busy) if busy else None
    if busy and max(busy) > 0.5:
        notes.append(
            f"the machine was busy: other processes kept up to {max(busy):.1f} threads runnable on average during a shown "
            f"run ({os.cpu_count()} CPUs, {threads} threads here); speed and wall numbers are unreliable, rerun on a "
            "quiet machine or with --repeat 3"
        )
    notes.append(
        "train images/s counts the training loop only on both sides (data loading, forward, backward, optimizer, "
        "scheduler, EMA; not the per-epoch evaluation and checkpoint saving)"
    )
    return result


# ---------------------------------------------------------------------------------------------------------------
# Report


def fmt(value, spec=".4f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def print_table(result: dict) -> None:
    kit, base = result.get("kit"), result.get("baseline")
    job = result["job"]
    print()
    print(f"recipe {result['recipe']} {' '.join(result['overrides'])}")
    print(
        f"train/validation/test rows {job['n']['train']}/{job['n']['validation']}/{job['n']['test']} | "
        f"{job['backbone']} ({'pretrained' if job['pretrained'] else 'scratch'}) | image {job['image_size']} | "
        f"batch {job['batch_size']} | epochs {job['epochs']} | lr {job['lr']} (kit head_lr {job['head_lr']}) | "
        f"wd {job['weight_decay']} | {job['scheduler']}, warmup {job['warmup_steps']}/{job['total_steps']} steps | "
        f"smoothing {job['label_smoothing']} | clip {job['max_grad_norm']} | ema {job['ema']} | seed {job['seed']} | "
        f"{job['precision']} | {job['threads']} threads, {job['num_workers']} workers | {job['device']}"
    )
    if job["baseline_optimizer"]:
        print(f"baseline: {job['baseline_optimizer']}, {job['baseline_scheduler']} stepped per update")
    rows = [
        ("test accuracy", lambda s: s["test"] and s["test"]["accuracy"], ".4f"),
        ("test f1_macro", lambda s: s["test"] and s["test"]["f1_macro"], ".4f"),
        ("best epoch", lambda s: s["best_epoch"], "d"),
        ("train images/s (loop only)", lambda s: s["train_samples_per_second"], ".2f"),
        ("train loop seconds", lambda s: s["train_seconds"], ".1f"),
        ("wall seconds (whole process)", lambda s: s["wall_seconds"], ".1f"),
        ("CPU seconds (whole process)", lambda s: s["cpu_seconds"], ".1f"),
        ("peak memory MB", lambda s: s["peak_memory_mb"], ".0f"),
        ("other processes' runnable threads", lambda s: s.get("other_runnable_threads"), ".1f"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print()
    print(f"{'':{width}}{'kit':>12}{'baseline':>12}{'kit/base':>10}")
    for label, get, spec in rows:
        a = get(kit) if kit else None
        b = get(base) if base else None
        ratio = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b and label.startswith(
            ("train images", "train loop", "wall", "CPU", "peak")) else None
        print(f"{label:{width}}{fmt(a, spec):>12}{fmt(b, spec):>12}{fmt(ratio, '.2f'):>10}")
    if kit and kit.get("test_rescored"):
        r = kit["test_rescored"]
        same = {True: "matches metrics.json", False: "DIFFERS from metrics.json", None: ""}[r.get("matches_metrics_json")]
        print(f"{'kit model/ re-scored by timm':{width}}{fmt(r['accuracy']):>12}  (accuracy), "
              f"{fmt(r['f1_macro'])} (f1_macro): {same}")
    for side in ("kit", "baseline"):
        if result.get(side):
            shown = "; ".join(
                f"{e['epoch']}: loss {fmt(e.get('loss'))} val "
                + " ".join(f"{k} {fmt(v)}" for k, v in e["validation"].items() if k != "loss")
                + (" ema " + " ".join(f"{k} {fmt(v)}" for k, v in e["validation_ema"].items() if k != "loss")
                   if e.get("validation_ema") else "")
                for e in result[side]["epochs"]
            )
            kept = " (EMA weights kept)" if result[side].get("best", {}).get("ema") else ""
            print(f"{side} epochs  {shown}{kept}")
    if result.get("speed_ratio") is not None:
        print(f"\nspeed kit/baseline (training images/s, loop only): {result['speed_ratio']:.2f}x")
    for note in result["notes"]:
        print(f"note: {note}")


def print_scratch(result: dict) -> None:
    """Pretrained vs from-scratch, side by side, for each side that ran."""
    scratch = result["scratch"]
    print()
    print(f"transfer check: backbone pretrained vs backbone.pretrained=false ({result['job']['backbone']}, "
          f"{result['job']['n']['train']} training images, {result['job']['epochs']} epochs)")
    cols = [(side, variant) for side in ("kit", "baseline") if result.get(side) for variant in ("pretrained", "scratch")]
    width = 26
    print(f"{'':{width}}" + "".join(f"{side + ' ' + variant:>20}" for side, variant in cols))
    rows = [
        ("test accuracy", lambda s: s["test"] and s["test"]["accuracy"], ".4f"),
        ("test f1_macro", lambda s: s["test"] and s["test"]["f1_macro"], ".4f"),
        ("best epoch", lambda s: s["best_epoch"], "d"),
        ("last val accuracy", lambda s: s["epochs"][-1]["validation"].get("accuracy"), ".4f"),
        ("train images/s", lambda s: s["train_samples_per_second"], ".2f"),
    ]
    for label, get, spec in rows:
        line = f"{label:{width}}"
        for side, variant in cols:
            source = result if variant == "pretrained" else scratch
            line += f"{fmt(get(source[side]) if source.get(side) else None, spec):>20}"
        print(line)
    for side in ("kit", "baseline"):
        if result.get(side) and scratch.get(side) and result[side]["test"] and scratch[side]["test"]:
            gain = result[side]["test"]["accuracy"] - scratch[side]["test"]["accuracy"]
            print(f"{side}: pretraining adds {gain * 100:+.1f} points of test accuracy")
    for note in scratch["notes"]:
        if note not in result["notes"]:
            print(f"note (scratch): {note}")


# ---------------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str]) -> int:
    if argv and argv[0] == WORKER_FLAG:
        result_path, threads, fused, scheduler_impl, recipe_arg, *overrides = argv[1:]
        baseline_worker(result_path, recipe_arg, overrides, int(threads), bool(fused), scheduler_impl)
        return 0

    parser = argparse.ArgumentParser(prog="bench_vision.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe file or built-in name")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for both sides")
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--kit-only", action="store_true")
    side.add_argument("--baseline-only", action="store_true")
    parser.add_argument("--compare-scratch", action="store_true",
                        help="also run everything with backbone.pretrained=false and print pretrained vs scratch")
    parser.add_argument("--out", help="also write the result JSON (indented) here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: usable CPUs)")
    parser.add_argument("--baseline-fused", action="store_true",
                        help="build the baseline's AdamW with fused=True, as the kit does (default: timm's default)")
    parser.add_argument("--baseline-scheduler", choices=("timm", "transformers"), default="timm",
                        help="the baseline's warmup+decay schedule: timm.scheduler (default) or transformers' "
                        "get_scheduler, which the kit uses (the same curve, to ~1e-16)")
    parser.add_argument("--workdir", default=None, help="where run folders go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--repeat", type=int, default=1, help="run each side N times, alternating the order; report "
                        "the best speed of each (default 1)")
    parser.add_argument("--verbose", action="store_true", help="show the children's output instead of logging it")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    overrides = [o for o in args.overrides if not o.startswith("output.dir=")]
    if len(overrides) != len(args.overrides):
        print("bench_vision: ignoring output.dir=...: the benchmark chooses its own run folders", file=sys.stderr)
    threads = args.threads or len(os.sched_getaffinity(0))
    os.environ.update(child_env(threads))  # this process scores the kit's model: same threads, offline too
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_vision-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    if args.compare_scratch:
        if any(o.startswith("backbone.pretrained=") for o in overrides):
            parser.error("--compare-scratch sets backbone.pretrained itself; drop the override")
        result = bench(args, args.recipe, overrides, workdir / "pretrained", threads, "pretrained")
        scratch = None
        if result is not None:
            scratch = bench(args, args.recipe, [*overrides, "backbone.pretrained=false"], workdir / "scratch", threads,
                            "scratch")
        if result is None or scratch is None:
            return 1
        result["scratch"] = scratch
    else:
        result = bench(args, args.recipe, overrides, workdir, threads, "")
        if result is None:
            return 1

    print_table(result)
    if args.compare_scratch:
        print_table(result["scratch"])
        print_scratch(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work folder kept: {workdir}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
