"""The training loop: epochs of steps, validation after each (or every train.eval_every steps), the best evaluation
kept, early stopping, train.max_steps, checkpoints on the way, and a stop on Ctrl-C or SIGTERM at a step boundary."""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from finetune import problems, transfer
from finetune.checkpoints import Progress, latest_checkpoint, save_best, save_checkpoint
from finetune.errors import FinetuneError
from finetune.metrics import is_improvement
from finetune.optim import METRIC_DRIVEN
from finetune.progress import epoch_progress, pass_progress


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, problem: str, label_smoothing: float = 0.0,
            class_weights: torch.Tensor | None = None) -> torch.Tensor:
    return problems.get(problem).loss(logits, labels, label_smoothing, class_weights)


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def evaluate_split(accelerator, model, loader, splits, recipe, details: dict | None = None,
                   variety: dict | None = None, name: str = "validation") -> dict:
    """Loss and metrics over a whole split, gathered from every process without the padding of uneven batches.

    details: a dict to fill with what the averages hide (the confusion matrix, per-label or per-entity F1).
    variety: a dict to fill with how many different answers the predictions and the truth hold (finetune.health).
    """
    problem = problems.get(splits.problem)
    model.eval()
    batches = []
    for batch in pass_progress(loader, name, len(loader), not accelerator.is_local_main_process):
        labels = batch.pop("labels")
        with accelerator.autocast():  # the prepared model is already wrapped in it; an EMA copy is not
            output = logits_of(model(**batch))
        logits, labels = problem.gather(accelerator, output.float(), labels)
        batches.append((logits.cpu(), labels.cpu()))
    return problem.score(batches, recipe.eval.metrics, splits, recipe.head.threshold, details, variety)


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


INTERRUPT = _Interrupt()


def planned_epochs(t, batches_per_epoch: int) -> int:
    """Epochs to run: train.epochs, or with train.max_steps as many as its steps need (the last one cut short)."""
    if t.max_steps is None:
        return t.epochs
    return math.ceil(t.max_steps / max(1, math.ceil(batches_per_epoch / t.grad_accum)))


@dataclass
class Training:
    """What the loop's functions share for one run (set up by finetune.train): the prepared model, optimizer,
    scheduler and loaders, the task's job, the recipe, the log, where training stands, the EMA."""

    accelerator: object
    model: object
    optimizer: object
    scheduler: object
    loaders: dict
    job: object
    recipe: object
    say: Callable[[str], None]
    progress: Progress
    ema: object = None
    best_details: dict = field(default_factory=dict)  # what the best evaluation's averages hide: kept, not recomputed

    @property
    def epochs(self) -> int:
        return planned_epochs(self.recipe.train, len(self.loaders["train"]))


def fit(run: Training, on_epoch=None, checkpoints: bool = True) -> dict:
    """Train and validate (after each epoch, or every train.eval_every steps), keep the best evaluation's weights
    (raw or EMA), step a metric-driven lr schedule, stop early if asked, stop at train.max_steps. checkpoints=False
    writes no resumable checkpoint (a run that is never resumed); the best weights are kept either way.

    on_epoch(epoch, validation metrics): called after each epoch's checkpoint (a sweep reports to its pruner)."""
    unfreezing = Unfreezing(run) if transfer.has_freeze_schedule(run.recipe) else None
    p = run.progress
    while p.epoch <= run.epochs:
        epoch = p.epoch
        if unfreezing is not None:
            unfreezing.start(epoch)
        stopping = train_epoch(run, checkpoints)
        stopping = end_epoch(run, epoch, stopping, checkpoints)
        if on_epoch is not None and p.history and p.history[-1]["epoch"] == epoch:
            on_epoch(epoch, p.history[-1]["validation"])  # a sweep's report to its pruner, which may end the run
        if stopping:
            break
    return run_metrics(run)


class Unfreezing:
    """train.freeze's schedule: the layers that train change between epochs (finetune.transfer.trainable_depth)."""

    def __init__(self, run: Training):
        self.run = run
        self.depths, self.top = transfer.layer_ids(run.accelerator.unwrap_model(run.model))
        self.depth = "unset"

    def start(self, epoch: int) -> None:
        """Set what trains in this epoch, and say so when it changed."""
        depth = transfer.trainable_depth(self.run.recipe, epoch, self.top)
        if depth == self.depth:
            return
        self.depth, top = depth, self.top
        count = transfer.apply_freeze(self.run.accelerator.unwrap_model(self.run.model), depth, self.depths)
        part = "everything" if depth is None else "the head" + (f" and layers {depth}-{top}" if depth <= top else "")
        self.run.say(f"epoch {epoch}: training {part} ({count / 1e6:.2f}M parameters)")


def end_epoch(run: Training, epoch: int, stopping: bool, checkpoints: bool) -> bool:
    """After an epoch's steps: its time counted, its validation (unless train.eval_every just made it), the
    progress moved on, a checkpoint; True: training stops."""
    t, p = run.recipe.train, run.progress
    seconds, samples = p.epoch_seconds, p.epoch_samples
    p.train_seconds += seconds
    p.train_samples += samples
    finished = stopping or epoch >= run.epochs or (t.max_steps is not None and p.step >= t.max_steps)
    just_evaluated = bool(p.history) and p.history[-1].get("step") == p.step
    if t.eval_every is None or (finished and not just_evaluated):
        stopping = validate_epoch(run, epoch) or stopping  # eval_every: the last step's weights are evaluated too
    if t.eval_every is not None:
        run.say(f"epoch {epoch}/{run.epochs}: train loss {epoch_loss(p):.4f} | "
                f"{samples / max(seconds, 1e-9):.1f} samples/s")
    p.epoch, p.batch, p.epoch_loss, p.epoch_samples, p.epoch_seconds = epoch + 1, 0, [], 0, 0.0
    if stopping or finished:
        p.epoch = run.epochs + 1  # a resumed run must not train on
    if checkpoints:
        save_checkpoint(run.accelerator, Path(run.recipe.output.dir), p, t.keep_checkpoints)
    return stopping


def epoch_loss(p: Progress) -> float:
    return (torch.tensor(p.epoch_loss) / max(p.batch, 1)).mean().item()  # the epoch's mean so far


def validate_epoch(run: Training, epoch: int) -> bool:
    """One evaluation at step p.step: recorded, the best kept, the lr schedule told; True: stop early."""
    t, p, select = run.recipe.train, run.progress, run.recipe.eval.select_best
    loss = epoch_loss(p)
    details, ema_details, variety, ema_variety = {}, {}, {}, {}
    validation = evaluate_split(run.accelerator, run.model, run.loaders["validation"], run.job.splits, run.recipe,
                                details, variety)
    entry = {"epoch": epoch, "step": p.step, "loss": loss, "validation": validation}
    if run.ema is not None:
        entry["validation_ema"] = evaluate_split(run.accelerator, run.ema.module, run.loaders["validation"],
                                                 run.job.splits, run.recipe, ema_details, ema_variety,
                                                 "validation (EMA)")
    if variety.get("predicted") is not None:  # kept in the history, so a resumed run's health counts them all
        entry["distinct_predictions"] = max(variety["predicted"], ema_variety.get("predicted") or 0)
        entry["distinct_truths"] = variety["true"]
    p.history.append(entry)
    run.accelerator.log({f"validation/{k}": v for k, v in validation.items()} | {"train/epoch_loss": loss},
                        step=p.step)
    say_evaluation(run, entry)
    for use_ema, scores, found in ((False, validation, details), (True, entry.get("validation_ema"), ema_details)):
        if scores is not None and (p.best is None or is_improvement(select, scores[select], p.best[select])):
            keep_best(run, entry, use_ema, scores, found)
    if t.scheduler in METRIC_DRIVEN:  # once per evaluation, not once per process as accelerate's wrapper would
        getattr(run.scheduler, "scheduler", run.scheduler).step(validation[select])
    return stop_early(run, validation)


def say_evaluation(run: Training, entry: dict) -> None:
    """The evaluation's line in the log: per epoch with its speed, or per train.eval_every steps."""
    t, p = run.recipe.train, run.progress
    shown = " ".join(f"{k} {v:.4f}" for k, v in entry["validation"].items())
    if "validation_ema" in entry:
        shown += " | ema " + " ".join(f"{k} {v:.4f}" for k, v in entry["validation_ema"].items())
    epoch, loss = entry["epoch"], entry["loss"]
    if t.eval_every is None:
        seconds = p.epoch_seconds
        run.say(f"epoch {epoch}/{run.epochs}: train loss {loss:.4f} | validation {shown} | "
                f"{p.epoch_samples / max(seconds, 1e-9):.1f} samples/s")
    else:
        run.say(f"step {p.step} (epoch {epoch}/{run.epochs}): train loss {loss:.4f} | validation {shown}")


def keep_best(run: Training, entry: dict, use_ema: bool, scores: dict, details: dict) -> None:
    """The evaluation is the best so far: its weights (raw or EMA) and its details kept."""
    p = run.progress
    where = {"epoch": entry["epoch"]} | ({"step": p.step} if run.recipe.train.eval_every is not None else {})
    p.best = {**where, "ema": use_ema, **scores}
    save_best(run.accelerator, run.ema.module if use_ema else run.model, Path(run.recipe.output.dir),
              run.job.saved_names)
    run.best_details.clear()
    run.best_details.update(details, evaluated=True)


def stop_early(run: Training, validation: dict) -> bool:
    """train.early_stopping: True when its metric has not improved for `patience` evaluations."""
    t, p = run.recipe.train, run.progress
    stop = t.early_stopping
    if stop is None:
        return False
    improved = is_improvement(stop.metric, validation[stop.metric], _best_of(p.history[:-1], stop.metric))
    p.stale = 0 if improved else p.stale + 1
    if p.stale >= stop.patience:
        unit = "epoch(s)" if t.eval_every is None else f"evaluation(s) (every {t.eval_every} steps)"
        run.say(f"early stopping: validation {stop.metric} has not improved for {p.stale} {unit}")
        return True
    return False


def run_metrics(run: Training) -> dict:
    """metrics.json's training part, with the best evaluation's details (train pops them)."""
    p = run.progress
    best = dict(p.best)
    if run.ema is None:
        best.pop("ema")
    return {
        "train": {
            "samples_per_second": p.train_samples / p.train_seconds if p.train_seconds else 0.0,
            "seconds": p.train_seconds,
            "samples": p.train_samples,
            "peak_memory_mb": peak_memory_mb(),
            "processes": run.accelerator.num_processes,
        },
        "epochs": p.history,
        "best": best,
        "steps": p.steps,
        # the best evaluation's details when this process made it (not before a resume): train pops them
        "best_details": run.best_details,
    }


def train_epoch(run: Training, checkpoints: bool = True) -> bool:
    """Train the rest of epoch p.epoch (all of it, or what follows p.batch after a resume; at train.max_steps it
    ends there), updating p. With train.eval_every, validate runs every that many steps; True: stop early.

    Data order is a function of (seed, epoch) alone, so a resumed epoch sees the same batches; the loss is checked
    for non-finite values without a host sync per step (at logging and checkpoint steps, and at the end).
    """
    accelerator, model, loader, recipe, p = run.accelerator, run.model, run.loaders["train"], run.recipe, run.progress
    t = recipe.train
    model.train()
    transfer.freeze_modes(model)  # frozen layers keep their pretrained BatchNorm statistics and no dropout
    seed_epoch(loader, t.seed, p.epoch)
    batches = accelerator.skip_first_batches(loader, p.batch) if p.batch else loader
    seed_epoch(batches, t.seed, p.epoch)
    first_bad = torch.tensor(-1, device=accelerator.device)  # the first step whose loss was not finite
    bar = epoch_progress(batches, f"epoch {p.epoch}/{run.epochs}", not accelerator.is_local_main_process, p.batch,
                         len(loader))  # a bar at a terminal, a plain line every 30 s in a log
    clock = EpochClock(accelerator, p)
    stopping = False
    for batch in bar:
        loss, size = train_step(accelerator, model, run.optimizer, run.scheduler, batch, run.job, recipe)
        clock.total_loss += loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), p.step + 1, first_bad)
        p.batch += 1
        p.epoch_samples += size * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        p.step += 1
        if run.ema is not None:
            run.ema.update(accelerator.unwrap_model(model), step=p.step)
        logging = p.step % 10 == 0
        evaluating = t.eval_every is not None and p.step % t.eval_every == 0
        reached = t.max_steps is not None and p.step >= t.max_steps
        checkpointing = (checkpoints and t.checkpoint_every is not None and p.step % t.checkpoint_every == 0
                         and p.batch < len(loader))
        if logging or checkpointing or evaluating:  # .item() is a device sync point: not every step
            _stop_if_not_finite(first_bad, p, Path(recipe.output.dir))
        if logging:
            log_step(run, loss, clock.total_loss, bar)
        if evaluating:
            stopping = validate_within_epoch(run, clock)
        interrupted = INTERRUPT.requested and accelerator.num_processes == 1
        checkpointing = checkpointing and not (stopping or reached)  # then the epoch's end checkpoints at once
        if checkpointing or (interrupted and checkpoints):
            clock.record()
            save_checkpoint(accelerator, Path(recipe.output.dir), p, t.keep_checkpoints)
        if interrupted:  # at a step boundary, after a checkpoint of exactly this point
            raise KeyboardInterrupt
        if stopping or reached:
            break
    _stop_if_not_finite(first_bad, p, Path(recipe.output.dir))
    clock.record()
    return stopping


class EpochClock:
    """An epoch's running loss sum (on the device) and its training seconds, evaluations left out."""

    def __init__(self, accelerator, p: Progress):
        self.accelerator, self.p = accelerator, p
        self.total_loss = torch.tensor(
            p.epoch_loss[accelerator.process_index] if p.epoch_loss else 0.0, device=accelerator.device
        )
        self.start, self.seconds_before = time.perf_counter(), p.epoch_seconds

    def record(self) -> None:
        """The epoch so far into p: each process's loss sum, the training seconds."""
        self.p.epoch_loss = self.accelerator.gather(self.total_loss.reshape(1)).tolist()
        self.p.epoch_seconds = self.seconds_before + time.perf_counter() - self.start

    def pause(self, seconds: float) -> None:
        self.start += seconds  # training time only


def log_step(run: Training, loss: torch.Tensor, total_loss: torch.Tensor, bar) -> None:
    """Every 10th step: the loss and lr to the trackers and the progress bar."""
    p = run.progress
    point = {"step": p.step, "loss": loss.item(), "lr": max(run.scheduler.get_last_lr())}
    run.accelerator.log({"train/loss": point["loss"], "train/lr": point["lr"]}, step=p.step)
    p.steps.append(point)
    bar.set_postfix(loss=f"{total_loss.item() / p.batch:.4f}")


def validate_within_epoch(run: Training, clock: EpochClock) -> bool:
    """train.eval_every's evaluation in the middle of an epoch; back to training after it. True: stop early."""
    clock.record()
    evaluation_start = time.perf_counter()
    stopping = validate_epoch(run, run.progress.epoch)
    clock.pause(time.perf_counter() - evaluation_start)
    run.model.train()
    transfer.freeze_modes(run.model)
    return stopping


def train_step(accelerator, model, optimizer, scheduler, batch: dict, job, recipe, on_phase=None):
    """One batch: forward, loss, backward, and at an accumulation boundary clipping and the optimizer step.

    Returns (loss, batch size). on_phase(name) is called after "forward" and "backward" (scripts/profile_step.py
    times the phases of this very step).
    """
    t = recipe.train
    with accelerator.accumulate(model):
        labels = batch.pop("labels")
        if job.distiller is not None:  # the teacher's soft targets beside the labels (finetune.distill)
            loss = job.distiller.loss(model, batch, labels)
        elif job.mixup is not None:  # soft targets; label smoothing is already inside them
            from timm.loss import SoftTargetCrossEntropy

            batch["pixel_values"], soft = job.mixup(batch["pixel_values"], labels)
            loss = SoftTargetCrossEntropy()(logits_of(model(**batch)).float(), soft)
        else:
            loss = loss_fn(logits_of(model(**batch)), labels, recipe.head.problem, t.label_smoothing,
                           job.class_weights)
        if on_phase is not None:
            on_phase("forward")
        accelerator.backward(loss)
        if on_phase is not None:
            on_phase("backward")
        if accelerator.sync_gradients and t.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        if t.scheduler not in METRIC_DRIVEN:  # those step on the validation metric, after each evaluation
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, len(labels)


def seed_epoch(loader, seed: int, epoch: int) -> None:
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
