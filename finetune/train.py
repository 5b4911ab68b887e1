"""Training: the Accelerate loop, per-epoch evaluation, best-checkpoint selection, early stopping, metrics.json."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from finetune import data as data_module
from finetune import export, recipe as recipe_module
from finetune import transfer
from finetune.errors import FinetuneError
from finetune.metrics import compute_metrics, is_improvement, predictions_from_logits
from finetune.model import (
    build_text_model,
    build_vision_model,
    fold_target_scaling,
    head_parameter_names,
    save_model,
    save_vision_model,
)
from finetune.optim import build_param_groups, build_scheduler, warmup_steps


def choose_precision(requested: str) -> str:
    """Accelerate's mixed_precision value; `auto` is bf16/fp16 on GPUs and fp32 on CPUs (bf16 there is ~400x slower)."""
    if requested == "fp32":
        return "no"
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if not cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not cuda:
        raise FinetuneError("train.precision: fp16 needs a GPU; use fp32 (or auto) on this machine")
    return requested


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, problem: str, label_smoothing: float = 0.0) -> torch.Tensor:
    logits = logits.float()
    if problem == "single_label":
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if problem == "multi_label":
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.mse_loss(logits.view(-1), labels.float().view(-1))  # standardised targets


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to touch an existing run unless asked; checked by every process before any of them writes."""
    if path.exists() and not path.is_dir():
        raise FinetuneError(f"output.dir: '{path}' is a file; choose a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FinetuneError(
            f"output.dir: '{path}' already holds a run; pass --overwrite to replace it or set output.dir=<new folder>"
        )


def _temporary(directory: Path) -> Path:
    return directory.with_name(directory.name + ".tmp")


def _replace_with_temporary(directory: Path) -> None:
    """Rename the finished temporary folder into place: a crash before this leaves the previous one intact."""
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(_temporary(directory), directory)
    shutil.rmtree(old, ignore_errors=True)


def _atomic_save(directory: Path, write) -> None:
    """Write into a temporary folder, then rename it into place."""
    shutil.rmtree(_temporary(directory), ignore_errors=True)
    write(_temporary(directory))
    _replace_with_temporary(directory)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def evaluate(accelerator, model, loader, splits, recipe, details: dict | None = None) -> dict:
    """Loss and metrics over a whole split, gathered from every process without the padding of uneven batches.

    details: a dict to fill with the confusion matrix (single_label) or per-label F1 (multi_label).
    """
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        labels = batch.pop("labels")
        logits = logits_of(model(**batch)).float()
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    problem = recipe.head.problem
    results = {"loss": float(loss_fn(logits, labels, problem))}
    predictions = predictions_from_logits(logits.numpy(), problem, recipe.head.threshold)
    truth = labels.numpy()
    if problem == "regression":  # metrics in the targets' own units
        predictions = predictions * splits.target_std + splits.target_mean
        truth = truth.reshape(-1) * splits.target_std + splits.target_mean
    elif problem == "multi_label":
        truth = truth.astype(np.int64)
    results.update(compute_metrics(recipe.eval.metrics, truth, predictions))
    if details is not None:
        details.update(_details(problem, truth, predictions, splits.label_names))
    return results


def _details(problem: str, truth, predictions, label_names) -> dict:
    """What a table of averages hides: the confusion matrix, or each label's F1 (rows: truth, columns: prediction)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    if problem == "single_label":
        matrix = confusion_matrix(truth, predictions, labels=list(range(len(label_names))))
        return {"confusion": {"labels": list(label_names), "matrix": matrix.tolist()}}
    if problem == "multi_label":
        _, _, f1, support = precision_recall_fscore_support(truth, predictions, average=None, zero_division=0)
        return {"per_label": {"labels": list(label_names), "f1": f1.tolist(), "support": support.tolist()}}
    return {}


@dataclass
class Job:
    """What differs between text and images; everything after it (loop, metrics, export) is shared."""

    splits: object
    model: torch.nn.Module
    datasets: dict  # split name -> torch/datasets Dataset
    make_loader: Callable  # (dataset, batch_size, training) -> DataLoader
    save: Callable  # (unwrapped model, directory) -> writes model/ without the card
    mixup: Callable | None = None  # timm Mixup for image batches


def _text_job(recipe, accelerator) -> Job:
    t = recipe.train
    splits = data_module.load_splits(recipe)  # bad data fails here, before any run folder is made or removed
    model, tokenizer = build_text_model(recipe, splits.label_names)
    with accelerator.main_process_first():  # the main process tokenises and caches; the others read the cache
        datasets = {
            key: data_module.tokenize(table, tokenizer, recipe.data.max_length)
            for key, table in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
            if table is not None
        }
    return Job(
        splits,
        model,
        datasets,
        make_loader=lambda dataset, batch, training: data_module.make_loader(dataset, tokenizer, batch, training, t.seed),
        save=lambda unwrapped, directory: save_model(unwrapped, tokenizer, directory, recipe, splits.label_names),
    )


def _image_job(recipe, accelerator) -> Job:
    from finetune import images

    t = recipe.train
    splits = images.load_image_splits(recipe)
    model, data_config = build_vision_model(recipe, splits.label_names)
    if _use_channels_last(recipe, model, accelerator):
        model = model.to(memory_format=torch.channels_last)
    mixup = images.build_mixup(recipe, len(splits.label_names or []))
    augmenting = not augmentation_off(recipe)
    datasets = {
        key: images.ImageDataset(table, images.build_transforms(data_config, recipe, training=key == "train" and augmenting))
        for key, table in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
        if table is not None
    }

    def make_loader(dataset, batch, training):
        # mixup pairs each image with the batch reversed: an odd last batch would pair one image with itself
        drop_last = training and mixup is not None
        return images.make_image_loader(dataset, batch, training, t.seed, recipe.data.num_workers, drop_last)

    return Job(
        splits,
        model,
        datasets,
        make_loader=make_loader,
        save=lambda unwrapped, directory: save_vision_model(unwrapped, directory, recipe, splits.label_names, data_config),
        mixup=mixup,
    )


def augmentation_off(recipe) -> bool:
    """No random change to training images: they are then preprocessed exactly like evaluation ones."""
    a = recipe.augment
    return (
        recipe.task != "image-classification"
        or (a.auto_augment is None and a.random_erasing == 0 and a.mixup == 0 and a.cutmix == 0 and a.hflip == 0
            and list(a.scale) == [1.0, 1.0])
    )


def _use_channels_last(recipe, model, accelerator) -> bool:
    """channels_last speeds up convolutions on GPUs; on CPUs and for transformers it is not worth the copies."""
    if recipe.train.channels_last is not None:
        return recipe.train.channels_last
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return has_conv and accelerator.device.type == "cuda"


def train(recipe, overwrite: bool = False) -> dict:
    """Fine-tune as the recipe says, write the run folder, return metrics.json's content."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t = recipe.train
    out = Path(recipe.output.dir)
    prepare_output_dir(out, overwrite)
    from accelerate.utils import DistributedDataParallelKwargs

    dynamic_freeze = transfer.has_freeze_schedule(recipe)
    accelerator = Accelerator(
        # without a GPU, accelerate only runs multi-process (torchrun, gloo) when told it is on the CPU
        cpu=not torch.accelerator.is_available(),
        mixed_precision=choose_precision(t.precision),
        gradient_accumulation_steps=t.grad_accum,
        log_with="tensorboard",
        project_dir=str(out),
        # DDP registers the weights that train when it wraps the model; a schedule that unfreezes later needs them
        # all registered and the frozen ones skipped step by step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if dynamic_freeze else None,
    )
    set_seed(t.seed)
    # data and model first: bad input fails here, before any run folder is made or removed
    job = _image_job(recipe, accelerator) if recipe.task == "image-classification" else _text_job(recipe, accelerator)
    if recipe.lora is not None:
        job.model = transfer.apply_lora(job.model, recipe.lora)
    splits = job.splits
    say = _open_run_folder(accelerator, out, overwrite, recipe)
    if accelerator.is_main_process:
        (out / "split.json").write_text(json.dumps(splits.info, indent=1) + "\n")
    skipped = sum(len(part.get("skipped", [])) for part in splits.info["splits"].values())
    if skipped:
        say(f"skipped {skipped} unreadable image(s) (data.skip_bad_images); split.json lists them")
    eval_batch = t.eval_batch_size or 2 * t.batch_size
    depths, top = transfer.layer_ids(job.model)
    if not dynamic_freeze and transfer.trainable_depth(recipe, 1, top) is not None:
        # a fixed freeze: frozen weights never reach the optimizer (or DDP)
        transfer.apply_freeze(job.model, transfer.trainable_depth(recipe, 1, top), depths)
    _use_cached_features(job, recipe, accelerator, eval_batch, say)
    model = job.model
    loaders = {
        key: job.make_loader(dataset, t.batch_size if key == "train" else eval_batch, key == "train")
        for key, dataset in job.datasets.items()
    }
    groups = build_param_groups(model, t.lr, t.head_lr, t.weight_decay, _head_names(model), depths, t.layer_decay)
    optimizer = torch.optim.AdamW(groups, fused=True)  # one kernel for all tensors: ~10x faster steps than the loop
    # Steps as one process would count them: accelerate steps the scheduler once per process per optimizer step.
    total_steps = math.ceil(len(loaders["train"]) / t.grad_accum) * t.epochs
    warmup = warmup_steps(t.warmup, total_steps) * (1 if isinstance(t.warmup, float) else accelerator.num_processes)
    scheduler = build_scheduler(optimizer, t.scheduler, warmup, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loaders = {key: accelerator.prepare(loader) for key, loader in loaders.items()}
    accelerator.init_trackers("tensorboard", config=_flat(recipe_module.to_dict(recipe)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    sizes = " | ".join(f"{key} {len(dataset)}" for key, dataset in job.datasets.items())
    say(
        f"{sizes} examples; {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable "
        f"({100 * trainable / total:.2f}%); {accelerator.num_processes} process(es) on {accelerator.device}, "
        f"precision {accelerator.mixed_precision}"
    )

    metrics = _fit(accelerator, model, optimizer, scheduler, loaders, job, recipe, say)

    # the kept model: the best epoch's weights (raw or EMA), tested, then predicting in the targets' own units
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(load_file(out / "checkpoints" / "best" / "model.safetensors"))
    details: dict = {}
    if "test" in loaders:
        metrics["test"] = evaluate(accelerator, model, loaders["test"], splits, recipe, details)
        say("test " + " ".join(f"{k} {v:.4f}" for k, v in metrics["test"].items()))
    else:
        evaluate(accelerator, model, loaders["validation"], splits, recipe, details)
    for value in details.values():
        value["split"] = "test" if "test" in loaders else "validation"
    metrics.update(details)
    final = unwrapped.model if isinstance(unwrapped, transfer.CachedHead) else unwrapped
    if recipe.head.problem == "regression":
        fold_target_scaling(transfer.plain_model(final), splits.target_mean, splits.target_std)
    if accelerator.is_main_process:
        if transfer.is_lora(final):  # the small file: adapters and head, for peft users
            _atomic_save(out / "adapter", lambda d: final.save_pretrained(d))
            say(f"LoRA adapter saved to {out / 'adapter'}")
        final = transfer.merged(final)
        _atomic_save(out / "model", lambda d: export.export_model(job.save, final, d, recipe, splits, metrics))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        say(f"model saved to {out / 'model'}; metrics in {out / 'metrics.json'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it closes the trackers and the process group
    return metrics


def _head_names(model) -> set[str]:
    """Parameter names of the head in the model the optimizer sees (plain, LoRA-wrapped or cached-feature)."""
    if isinstance(model, transfer.CachedHead):
        return {f"model.{name}" for name in head_parameter_names(model.model)}
    if transfer.is_lora(model):
        return {name for name, _ in model.named_parameters() if "modules_to_save" in name}
    return head_parameter_names(model)


def _use_cached_features(job: Job, recipe, accelerator, eval_batch: int, say) -> None:
    """A frozen backbone without augmentation computes the same features every epoch: compute them once (cached on
    disk), and train the head alone on them. The job then holds feature data sets and a CachedHead model."""
    wanted = recipe.train.cache_features
    if wanted is False or not transfer.is_frozen_backbone(recipe):
        return
    split = transfer.feature_split(job.model, recipe)
    why = None
    if not augmentation_off(recipe):
        why = "augmentation changes the images every epoch (set augment.scale=[1,1], hflip=0 and the rest off)"
    elif split is None:
        why = f"the head of {type(job.model).__name__} cannot be separated from its backbone (use head.pooling=mean)"
    elif recipe.train.ema is not None:
        why = "train.ema averages the whole model"
    if why:
        if wanted:
            raise FinetuneError(f"train.cache_features: cannot cache features: {why}")
        say(f"training through the frozen backbone, not on cached features: {why}")
        return
    features_fn, head_fn = split
    model = job.model.to(accelerator.device)
    model_key = transfer.model_fingerprint(model)
    with accelerator.main_process_first():  # the main process computes and caches; the others read the cache
        features = {
            key: transfer.cached_features(
                model, features_fn, dataset, lambda d: job.make_loader(d, eval_batch, False),
                {"split": key, "model": model_key, "data": transfer.dataset_fingerprint(dataset),
                 "pooling": recipe.head.pooling, "kind": type(model).__name__},
                accelerator.device, say,
            )
            for key, dataset in job.datasets.items()
        }
    originals, make_original = job.datasets, job.make_loader
    job.datasets = {
        key: transfer.FeatureDataset(features[key], transfer.labels_of(dataset)) for key, dataset in originals.items()
    }

    def make_loader(dataset, batch, training):
        like = make_original(originals["train" if training else "validation"], batch, training)
        return transfer.make_feature_loader(dataset, batch, training, recipe.train.seed, like)

    job.make_loader = make_loader
    job.model = transfer.CachedHead(model, head_fn)
    say(f"training the head on cached features of the frozen backbone ({features['train'].shape[1]} per example)")


def _open_run_folder(accelerator, out: Path, overwrite: bool, recipe):
    """Create (or, with --overwrite, replace) the run folder; return the function that logs to it."""
    accelerator.wait_for_everyone()  # every process has checked the folder before the main one changes it
    if accelerator.is_main_process:
        try:
            if overwrite and out.is_dir():
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(recipe_module.to_yaml(recipe))
        except OSError as error:
            raise FinetuneError(f"output.dir: cannot write '{out}' ({error.strerror or error})") from None

    def say(message: str) -> None:
        """Progress for people: printed by the main process and kept in the run folder's train.log."""
        if accelerator.is_main_process:
            print(message, flush=True)
            with (out / "train.log").open("a") as log:
                log.write(message + "\n")

    return say


def _fit(accelerator, model, optimizer, scheduler, loaders, job, recipe, say) -> dict:
    """Train and validate epoch by epoch, keep the best checkpoint (raw or EMA weights), stop early if asked."""
    t, out, select = recipe.train, Path(recipe.output.dir), recipe.eval.select_best
    ema = None
    if t.ema is not None:
        from timm.utils import ModelEmaV3

        # warmup: the decay ramps up over the first steps, so a short run's EMA is not stuck near random init
        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=t.ema.decay, use_warmup=True)
    history, steps, best, stale = [], [], None, 0
    train_seconds, train_samples, step = 0.0, 0, 0
    schedule = transfer.has_freeze_schedule(recipe)
    depths, top = transfer.layer_ids(accelerator.unwrap_model(model)) if schedule else ({}, 0)
    depth = "unset"
    for epoch in range(1, t.epochs + 1):
        if schedule and transfer.trainable_depth(recipe, epoch, top) != depth:
            depth = transfer.trainable_depth(recipe, epoch, top)
            count = transfer.apply_freeze(accelerator.unwrap_model(model), depth, depths)
            part = "everything" if depth is None else "the head" + (f" and layers {depth}-{top}" if depth <= top else "")
            say(f"epoch {epoch}: training {part} ({count / 1e6:.2f}M parameters)")
        loss, seconds, samples, step = _train_epoch(
            accelerator, model, optimizer, scheduler, loaders["train"], job, recipe, epoch, step, ema, steps
        )
        train_seconds += seconds
        train_samples += samples
        validation = evaluate(accelerator, model, loaders["validation"], job.splits, recipe)
        entry = {"epoch": epoch, "loss": loss, "validation": validation}
        shown = " ".join(f"{k} {v:.4f}" for k, v in validation.items())
        if ema is not None:
            entry["validation_ema"] = evaluate(accelerator, ema.module, loaders["validation"], job.splits, recipe)
            shown += " | ema " + " ".join(f"{k} {v:.4f}" for k, v in entry["validation_ema"].items())
        history.append(entry)
        accelerator.log({f"validation/{k}": v for k, v in validation.items()} | {"train/epoch_loss": loss}, step=step)
        say(f"epoch {epoch}/{t.epochs}: train loss {loss:.4f} | validation {shown} | {samples / seconds:.1f} samples/s")
        for use_ema, scores in ((False, validation), (True, entry.get("validation_ema"))):
            if scores is not None and (best is None or is_improvement(select, scores[select], best[select])):
                best = {"epoch": epoch, "ema": use_ema, **scores}
                _save_best(accelerator, ema.module if use_ema else model, out)
        _save_last(accelerator, out)
        stop = t.early_stopping
        if stop is not None:
            improved = is_improvement(stop.metric, validation[stop.metric], _best_of(history[:-1], stop.metric))
            stale = 0 if improved else stale + 1
            if stale >= stop.patience:
                say(f"early stopping: validation {stop.metric} has not improved for {stale} epoch(s)")
                break
    if ema is None:
        best.pop("ema")
    return {
        "train": {
            "samples_per_second": train_samples / train_seconds if train_seconds else 0.0,
            "seconds": train_seconds,
            "samples": train_samples,
            "peak_memory_mb": peak_memory_mb(),
            "processes": accelerator.num_processes,
        },
        "epochs": history,
        "best": best,
        "steps": steps,
    }


def _train_epoch(accelerator, model, optimizer, scheduler, loader, job, recipe, epoch, step, ema=None, steps=None):
    """One pass over the training data; returns (mean loss, seconds, samples seen by all processes, global step).

    steps: a list to append {"step", "loss", "lr"} to every 10 optimizer steps.
    """
    from timm.loss import SoftTargetCrossEntropy
    from tqdm.auto import tqdm

    t = recipe.train
    soft_target_loss = SoftTargetCrossEntropy()
    model.train()
    transfer.freeze_modes(model)  # frozen layers keep their pretrained BatchNorm statistics and no dropout
    total_loss, batches, samples = torch.zeros((), device=accelerator.device), 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{t.epochs}", disable=not accelerator.is_local_main_process, mininterval=1.0)
    start = time.perf_counter()
    for batch in bar:
        with accelerator.accumulate(model):
            labels = batch.pop("labels")
            if job.mixup is not None:  # soft targets; label smoothing is already inside them
                batch["pixel_values"], soft = job.mixup(batch["pixel_values"], labels)
                loss = soft_target_loss(logits_of(model(**batch)).float(), soft)
            else:
                loss = loss_fn(logits_of(model(**batch)), labels, recipe.head.problem, t.label_smoothing)
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total_loss += loss.detach()
        batches += 1
        samples += len(labels) * accelerator.num_processes
        if accelerator.sync_gradients:
            step += 1
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=step)
            if step % 10 == 0:  # .item() is a device sync point: not every step
                point = {"step": step, "loss": loss.item(), "lr": max(scheduler.get_last_lr())}
                accelerator.log({"train/loss": point["loss"], "train/lr": point["lr"]}, step=step)
                if steps is not None:
                    steps.append(point)
        if batches % 10 == 0:
            bar.set_postfix(loss=f"{total_loss.item() / batches:.4f}", samples_s=f"{samples / (time.perf_counter() - start):.1f}")
    seconds = time.perf_counter() - start
    mean_loss = accelerator.reduce(total_loss / max(batches, 1), reduction="mean").item()
    return mean_loss, seconds, samples, step


def _best_of(history: list[dict], metric: str):
    best = None
    for entry in history:
        if is_improvement(metric, entry["validation"][metric], best):
            best = entry["validation"][metric]
    return best


def _save_best(accelerator, model, out: Path) -> None:
    from safetensors.torch import save_file

    state = accelerator.get_state_dict(model)  # all processes take part (needed under FSDP/DeepSpeed)
    if accelerator.is_main_process:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        (out / "checkpoints").mkdir(exist_ok=True)
        _atomic_save(out / "checkpoints" / "best", lambda d: (d.mkdir(), save_file(tensors, d / "model.safetensors")))
    accelerator.wait_for_everyone()


def _save_last(accelerator, out: Path) -> None:
    """What resume needs: model, optimizer, scheduler and RNG states, via accelerate."""
    last = out / "checkpoints" / "last"
    accelerator.save_state(str(_temporary(last)))  # every process writes its own part
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_with_temporary(last)
    accelerator.wait_for_everyone()


def _flat(tree: dict, prefix: str = "") -> dict:
    """TensorBoard's hparams want flat scalars."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
