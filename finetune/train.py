"""Training: the Accelerate loop, per-epoch evaluation, best-checkpoint selection, early stopping, metrics.json."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from finetune import export, recipe as recipe_module
from finetune import precision, problems, transfer
from finetune.dropout import use_fast_dropout
from finetune.errors import FinetuneError
from finetune.metrics import is_improvement
from finetune.model import fold_target_scaling, head_parameter_names
from finetune.tasks import Job, get_task
from finetune.optim import build_param_groups, build_scheduler, warmup_steps
from finetune.precision import choose_precision  # noqa: F401  (its old home: scripts import it from here)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, problem: str, label_smoothing: float = 0.0,
            class_weights: torch.Tensor | None = None) -> torch.Tensor:
    return problems.get(problem).loss(logits, labels, label_smoothing, class_weights)


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def prepare_output_dir(path: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to touch an existing run unless asked; checked by every process before any of them writes."""
    if path.exists() and not path.is_dir():
        raise FinetuneError(f"output.dir: '{path}' is a file; choose a folder path")
    if resume:
        if overwrite:
            raise FinetuneError("--resume and --overwrite: pick one (continue the run, or replace it)")
        if (path / "metrics.json").is_file():
            raise FinetuneError(f"output.dir: the run in '{path}' has finished; nothing to resume (--overwrite reruns it)")
        return
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        unfinished = not (path / "metrics.json").is_file() and latest_checkpoint(path) is not None
        hint = "pass --resume to continue it, --overwrite to replace it" if unfinished else "pass --overwrite to replace it"
        raise FinetuneError(f"output.dir: '{path}' already holds a run; {hint}, or set output.dir=<new folder>")


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

    details: a dict to fill with what the averages hide (the confusion matrix, per-label or per-entity F1).
    """
    problem = problems.get(splits.problem)
    model.eval()
    batches = []
    for batch in loader:
        labels = batch.pop("labels")
        with accelerator.autocast():  # the prepared model is already wrapped in it; an EMA copy is not
            output = logits_of(model(**batch))
        logits, labels = problem.gather(accelerator, output.float(), labels)
        batches.append((logits.cpu(), labels.cpu()))
    return problem.score(batches, recipe.eval.metrics, splits, recipe.head.threshold, details)


def train(recipe, overwrite: bool = False, resume: bool = False) -> dict:
    """Fine-tune as the recipe says, write the run folder, return metrics.json's content.

    resume: continue the unfinished run in output.dir from its newest checkpoint (exactly: same weights and metrics
    as a run never interrupted); with no checkpoint yet, start it again.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    t = recipe.train
    out = Path(recipe.output.dir)
    prepare_output_dir(out, overwrite, resume)

    dynamic_freeze = transfer.has_freeze_schedule(recipe)
    # auto resumes at the precision the run started at (a checkpoint says which): resume stays exact
    resumed = precision.of_checkpoint(latest_checkpoint(out) if resume else None)
    mixed = precision.choose_precision(t.precision, resumed=resumed)
    precision.allow_accelerator_at(mixed)
    accelerator = Accelerator(
        # without a GPU, accelerate only runs multi-process (torchrun, gloo) when told it is on the CPU
        cpu=not torch.accelerator.is_available(),
        mixed_precision=mixed,
        gradient_accumulation_steps=t.grad_accum,
        log_with="tensorboard",
        project_dir=str(out),
        # DDP registers the weights that train when it wraps the model; a schedule that unfreezes later needs them
        # all registered and the frozen ones skipped step by step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if dynamic_freeze else None,
    )
    set_seed(t.seed)
    # data and model first: bad input fails here, before any run folder is made or removed
    job = get_task(recipe.task).job(recipe, accelerator)
    if recipe.lora is not None:
        job.model = transfer.apply_lora(job.model, recipe.lora)
    splits = job.splits
    job.class_weights = _class_weights(recipe, splits, accelerator.device)
    say = _open_run_folder(accelerator, out, overwrite, recipe, resume)
    if accelerator.is_main_process:
        (out / "split.json").write_text(json.dumps(splits.info, indent=1) + "\n")
    for warning in job.warnings:
        say(f"warning: {warning}")
    eval_batch = t.eval_batch_size or 2 * t.batch_size
    depths, top = transfer.layer_ids(job.model)
    first_depth = transfer.trainable_depth(recipe, 1, top)
    if not dynamic_freeze and first_depth is not None:
        # a fixed freeze: frozen weights never reach the optimizer (or DDP)
        transfer.apply_freeze(job.model, first_depth, depths)
    if t.freeze_embeddings:
        transfer.freeze_word_embeddings(job.model)
    if t.gradient_checkpointing:
        transfer.enable_gradient_checkpointing(job.model)
    if accelerator.device.type == "cpu":
        use_fast_dropout(job.model)  # torch's CPU dropout masks cost ~40% of a text forward pass
    _use_cached_features(job, recipe, accelerator, eval_batch, say)
    if t.compile:
        job.model.compile()  # in place: parameter names (checkpoints, export) stay those of the plain model
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
        f"({100 * trainable / total:.2f}%); {accelerator.num_processes} process(es) on {accelerator.device}"
    )
    say(precision.describe(accelerator.mixed_precision, t.precision))

    if transfer.is_frozen_backbone(recipe) or recipe.lora is not None:
        # the frozen weights never change: checkpoints hold only what trains (a LoRA or probe checkpoint is small,
        # and an epoch of a cached probe is not dominated by writing the backbone again)
        job.saved_names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        accelerator.register_save_state_pre_hook(lambda models, weights, _: [_keep_only(w, job.saved_names) for w in weights])
    ema = None
    if t.ema is not None:
        from timm.utils import ModelEmaV3

        # warmup: the decay ramps up over the first steps, so a short run's EMA is not stuck near random init
        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=t.ema.decay, use_warmup=True)
        accelerator.register_for_checkpointing(ema)
    progress = Progress()
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        progress = load_checkpoint(accelerator, checkpoint, strict=job.saved_names is None)
        say(f"resumed from {checkpoint}: epoch {progress.epoch}, {progress.batch} batches in, step {progress.step}")
    progress.precision = accelerator.mixed_precision
    try:
        _INTERRUPT.immediate = accelerator.num_processes > 1
        with _INTERRUPT:
            metrics = _fit(accelerator, model, optimizer, scheduler, loaders, job, recipe, say, progress, ema)
    except KeyboardInterrupt:
        kept = latest_checkpoint(out)
        if kept is not None:
            say(f"interrupted; {kept} holds the run so far: finetune run {out / 'config.yaml'} --resume")
        raise
    metrics["train"]["precision"] = precision.name(accelerator.mixed_precision)  # predict runs at it too

    # the kept model: the best epoch's weights (raw or EMA), tested, then predicting in the targets' own units
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(load_file(out / "checkpoints" / "best" / "model.safetensors"), strict=job.saved_names is None)
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
        if recipe.hub.repo_id:
            _push(out, recipe, say)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it closes the trackers and the process group
    return metrics


def _push(out: Path, recipe, say) -> None:
    """hub.repo_id: upload the finished run; a failed upload leaves the run as it is and says how to retry."""
    from finetune.hub import push_run

    try:
        say(f"pushed to {push_run(out, recipe.hub.repo_id, recipe.hub.private)}")
    except FinetuneError as error:
        say(f"warning: the run is saved, but the push failed: {error}; retry with: "
            f"finetune push {out} --repo-id {recipe.hub.repo_id}")


def _class_weights(recipe, splits, device) -> torch.Tensor | None:
    """train.class_weights as a tensor: auto is inverse class frequency in train, scaled to mean 1."""
    wanted = recipe.train.class_weights
    if wanted is None:
        return None
    names = splits.label_names
    if wanted == "auto":
        counts = np.bincount(np.asarray(splits.train["label"], dtype=np.int64), minlength=len(names)).astype(np.float64)
        weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(names), 0.0)
        weights = weights / weights[counts > 0].mean()
    else:
        if len(wanted) != len(names):
            raise FinetuneError(
                f"train.class_weights: {len(wanted)} weights for {len(names)} labels ({', '.join(map(str, names))}); "
                "give one per label, in this order, or use auto"
            )
        weights = np.asarray(wanted, dtype=np.float64)
    return torch.tensor(weights, dtype=torch.float32, device=device)


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
    if job.augmenting:
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
    mixed = accelerator.mixed_precision
    # the feature pass runs at the training precision; bf16 features are cached apart from fp32 ones
    with accelerator.main_process_first(), precision.autocast(accelerator.device, mixed):
        features = {
            key: transfer.cached_features(
                model, features_fn, dataset, lambda d: job.make_loader(d, eval_batch, False),
                {"split": key, "model": model_key, "data": transfer.dataset_fingerprint(dataset),
                 "pooling": recipe.head.pooling, "kind": type(model).__name__,
                 **({"precision": mixed} if mixed != "no" else {})},
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
        custom = like.sampler if hasattr(like.sampler, "set_epoch") else None  # same rows, same order
        return transfer.make_feature_loader(dataset, batch, training, recipe.train.seed, like, custom)

    job.make_loader = make_loader
    job.model = transfer.CachedHead(model, head_fn)
    say(f"training the head on cached features of the frozen backbone ({features['train'].shape[1]} per example)")


def _open_run_folder(accelerator, out: Path, overwrite: bool, recipe, resume: bool = False):
    """Create (or, with --overwrite, replace) the run folder; return the function that logs to it."""
    if resume and (out / "config.yaml").is_file():
        _check_same_recipe(out / "config.yaml", recipe)
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


def _check_same_recipe(saved: Path, recipe) -> None:
    """A resumed run must be the same run: every key as when it started."""
    before = _flat(recipe_module.parse_yaml(saved.read_text(), str(saved)) or {})
    now = _flat(recipe_module.parse_yaml(recipe_module.to_yaml(recipe), "recipe"))
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise FinetuneError(
            f"--resume: the recipe differs from the run's {saved} ({shown}); resume with the same recipe "
            f"(finetune run {saved} --resume) or start a new run in another output.dir"
        )


class _Interrupt:
    """Ctrl-C or SIGTERM during training asks the loop to stop at the next step boundary with a checkpoint (one
    process; with several, each would stop at a different step, so there the last periodic checkpoint counts)."""

    requested = False
    immediate = False  # several processes: stop now, from the last periodic checkpoint

    def __enter__(self):
        import signal
        import threading

        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum, frame):
        if self.requested or self.immediate:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("finetune: stopping at the next step with a checkpoint (Ctrl-C again to stop now)", flush=True)

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


_INTERRUPT = _Interrupt()


@dataclass
class Progress:
    """Where training stands: all a resumed run needs besides accelerate's state (weights, optimizer, scheduler, RNG)."""

    epoch: int = 1  # the epoch in progress (1-based)
    batch: int = 0  # batches of that epoch already trained
    step: int = 0  # optimizer steps over the whole run
    epoch_loss: list = field(default_factory=list)  # per process: the sum of its batch losses so far this epoch
    epoch_samples: int = 0
    epoch_seconds: float = 0.0
    train_seconds: float = 0.0  # finished epochs
    train_samples: int = 0
    history: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    best: dict | None = None
    stale: int = 0
    precision: str = ""  # accelerate's mixed_precision value: a resumed `auto` run keeps it


def _fit(accelerator, model, optimizer, scheduler, loaders, job, recipe, say, progress: Progress, ema) -> dict:
    """Train and validate epoch by epoch, keep the best checkpoint (raw or EMA weights), stop early if asked."""
    t, out, select = recipe.train, Path(recipe.output.dir), recipe.eval.select_best
    p = progress
    schedule = transfer.has_freeze_schedule(recipe)
    depths, top = transfer.layer_ids(accelerator.unwrap_model(model)) if schedule else ({}, 0)
    depth = "unset"
    while p.epoch <= t.epochs:
        epoch = p.epoch
        if schedule and transfer.trainable_depth(recipe, epoch, top) != depth:
            depth = transfer.trainable_depth(recipe, epoch, top)
            count = transfer.apply_freeze(accelerator.unwrap_model(model), depth, depths)
            part = "everything" if depth is None else "the head" + (f" and layers {depth}-{top}" if depth <= top else "")
            say(f"epoch {epoch}: training {part} ({count / 1e6:.2f}M parameters)")
        _train_epoch(accelerator, model, optimizer, scheduler, loaders["train"], job, recipe, p, ema)
        loss = (torch.tensor(p.epoch_loss) / max(p.batch, 1)).mean().item()
        seconds, samples = p.epoch_seconds, p.epoch_samples
        p.train_seconds += seconds
        p.train_samples += samples
        validation = evaluate(accelerator, model, loaders["validation"], job.splits, recipe)
        entry = {"epoch": epoch, "loss": loss, "validation": validation}
        shown = " ".join(f"{k} {v:.4f}" for k, v in validation.items())
        if ema is not None:
            entry["validation_ema"] = evaluate(accelerator, ema.module, loaders["validation"], job.splits, recipe)
            shown += " | ema " + " ".join(f"{k} {v:.4f}" for k, v in entry["validation_ema"].items())
        p.history.append(entry)
        accelerator.log({f"validation/{k}": v for k, v in validation.items()} | {"train/epoch_loss": loss}, step=p.step)
        say(f"epoch {epoch}/{t.epochs}: train loss {loss:.4f} | validation {shown} | {samples / max(seconds, 1e-9):.1f} samples/s")
        for use_ema, scores in ((False, validation), (True, entry.get("validation_ema"))):
            if scores is not None and (p.best is None or is_improvement(select, scores[select], p.best[select])):
                p.best = {"epoch": epoch, "ema": use_ema, **scores}
                _save_best(accelerator, ema.module if use_ema else model, out, job.saved_names)
        stop = t.early_stopping
        stopping = False
        if stop is not None:
            improved = is_improvement(stop.metric, validation[stop.metric], _best_of(p.history[:-1], stop.metric))
            p.stale = 0 if improved else p.stale + 1
            stopping = p.stale >= stop.patience
        p.epoch, p.batch, p.epoch_loss, p.epoch_samples, p.epoch_seconds = epoch + 1, 0, [], 0, 0.0
        if stopping:
            say(f"early stopping: validation {stop.metric} has not improved for {p.stale} epoch(s)")
            p.epoch = t.epochs + 1  # a resumed run must not train on
        save_checkpoint(accelerator, out, p, t.keep_checkpoints)
        if stopping:
            break
    best = dict(p.best)
    if ema is None:
        best.pop("ema")
    return {
        "train": {
            "samples_per_second": p.train_samples / p.train_seconds if p.train_seconds else 0.0,
            "seconds": p.train_seconds,
            "samples": p.train_samples,
            "peak_memory_mb": peak_memory_mb(),
            "processes": accelerator.num_processes,
        },
        "epochs": p.history,
        "best": best,
        "steps": p.steps,
    }


def _train_epoch(accelerator, model, optimizer, scheduler, loader, job, recipe, p: Progress, ema=None) -> None:
    """Train the rest of epoch p.epoch (all of it, or what follows p.batch after a resume), updating p.

    Data order is a function of (seed, epoch) alone, so a resumed epoch sees the same batches; the loss is checked
    for non-finite values without a host sync per step (at logging and checkpoint steps, and at the end).
    """
    from timm.loss import SoftTargetCrossEntropy
    from tqdm.auto import tqdm

    t = recipe.train
    soft_target_loss = SoftTargetCrossEntropy()
    model.train()
    transfer.freeze_modes(model)  # frozen layers keep their pretrained BatchNorm statistics and no dropout
    _seed_epoch(loader, t.seed, p.epoch)
    batches = accelerator.skip_first_batches(loader, p.batch) if p.batch else loader
    _seed_epoch(batches, t.seed, p.epoch)
    total_loss = torch.tensor(p.epoch_loss[accelerator.process_index] if p.epoch_loss else 0.0, device=accelerator.device)
    first_bad = torch.tensor(-1, device=accelerator.device)  # the first step whose loss was not finite
    bar = tqdm(batches, desc=f"epoch {p.epoch}/{t.epochs}", disable=not accelerator.is_local_main_process,
               mininterval=1.0, initial=p.batch, total=len(loader))
    start, seconds_before = time.perf_counter(), p.epoch_seconds
    weights = job.class_weights
    for batch in bar:
        with accelerator.accumulate(model):
            labels = batch.pop("labels")
            if job.mixup is not None:  # soft targets; label smoothing is already inside them
                batch["pixel_values"], soft = job.mixup(batch["pixel_values"], labels)
                loss = soft_target_loss(logits_of(model(**batch)).float(), soft)
            else:
                loss = loss_fn(logits_of(model(**batch)), labels, recipe.head.problem, t.label_smoothing, weights)
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total_loss += loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), p.step + 1, first_bad)
        p.batch += 1
        p.epoch_samples += len(labels) * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        p.step += 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step=p.step)
        logging = p.step % 10 == 0
        checkpointing = t.checkpoint_every is not None and p.step % t.checkpoint_every == 0 and p.batch < len(loader)
        if logging or checkpointing:  # .item() is a device sync point: not every step
            _stop_if_not_finite(first_bad, p, Path(recipe.output.dir))
        if logging:
            point = {"step": p.step, "loss": loss.item(), "lr": max(scheduler.get_last_lr())}
            accelerator.log({"train/loss": point["loss"], "train/lr": point["lr"]}, step=p.step)
            p.steps.append(point)
            bar.set_postfix(loss=f"{total_loss.item() / p.batch:.4f}")
        interrupted = _INTERRUPT.requested and accelerator.num_processes == 1
        if checkpointing or interrupted:
            p.epoch_loss = accelerator.gather(total_loss.reshape(1)).tolist()  # each process its own
            p.epoch_seconds = seconds_before + time.perf_counter() - start
            save_checkpoint(accelerator, Path(recipe.output.dir), p, t.keep_checkpoints)
        if interrupted:  # at a step boundary, after a checkpoint of exactly this point
            raise KeyboardInterrupt
    _stop_if_not_finite(first_bad, p, Path(recipe.output.dir))
    p.epoch_loss = accelerator.gather(total_loss.reshape(1)).tolist()
    p.epoch_seconds = seconds_before + time.perf_counter() - start


def _seed_epoch(loader, seed: int, epoch: int) -> None:
    """Shuffle order (and image workers' seeds) from (seed, epoch) alone, not from how many epochs ran before."""
    generator = getattr(loader, "generator", None)
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    for g in {id(x): x for x in (generator, getattr(sampler, "generator", None)) if x is not None}.values():
        g.manual_seed(seed * 1_000_003 + epoch)
    if hasattr(loader, "set_epoch"):  # accelerate's loaders pass it on to our samplers (finetune.sampling)
        loader.set_epoch(epoch)


def _stop_if_not_finite(first_bad: torch.Tensor, p: Progress, out: Path) -> None:
    bad = int(first_bad.item())
    if bad >= 0:
        kept = latest_checkpoint(out)
        where = f"; the last good checkpoint {kept} is kept (resume with --resume)" if kept else ""
        raise FinetuneError(
            f"train: the loss is not finite (nan or inf) at step {bad}, epoch {p.epoch}{where}; "
            "lower train.lr, set train.max_grad_norm, or check the labels"
        )


def _best_of(history: list[dict], metric: str):
    best = None
    for entry in history:
        if is_improvement(metric, entry["validation"][metric], best):
            best = entry["validation"][metric]
    return best


def _keep_only(state: dict, names: set) -> None:
    for name in [n for n in state if n not in names]:
        del state[name]


def _save_best(accelerator, model, out: Path, names: set | None = None) -> None:
    """The best epoch's weights (only `names` when given: what trains)."""
    from safetensors.torch import save_file

    state = accelerator.get_state_dict(model)  # all processes take part (needed under FSDP/DeepSpeed)
    if names is not None:
        _keep_only(state, names)
    if accelerator.is_main_process:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        (out / "checkpoints").mkdir(exist_ok=True)
        _atomic_save(out / "checkpoints" / "best", lambda d: (d.mkdir(), save_file(tensors, d / "model.safetensors")))
    accelerator.wait_for_everyone()


CHECKPOINT_PREFIX = "step-"
PROGRESS_FILE = "progress.json"


def save_checkpoint(accelerator, out: Path, progress: Progress, keep: int) -> None:
    """A resumable checkpoint, checkpoints/step-N: accelerate's state (model, optimizer, scheduler, RNG, registered
    EMA) and our progress, written under a temporary name and renamed into place; then the oldest beyond `keep` go."""
    folder = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{progress.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(_temporary(folder), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(_temporary(folder)))  # every process writes its own part
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (_temporary(folder) / PROGRESS_FILE).write_text(json.dumps(dataclasses.asdict(progress)) + "\n")
        _replace_with_temporary(folder)
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary folder left by a kill during a save is not one)."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / PROGRESS_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(out: Path) -> Path | None:
    found = _checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(accelerator, folder: Path, strict: bool = True) -> Progress:
    accelerator.load_state(str(folder), strict=strict)
    return Progress(**json.loads((folder / PROGRESS_FILE).read_text()))


def _flat(tree: dict, prefix: str = "") -> dict:
    """TensorBoard's hparams want flat scalars."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
