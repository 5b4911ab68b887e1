"""A training run: the recipe's task, model and data set up, LoRA and freezing applied, features cached when they
can be, the optimizer and Accelerate prepared, the loop run (finetune.loop), the kept model tested and exported."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from finetune import allocator, calibration, contrastive, health, recipe as recipe_module
from finetune import phases, precision, problems, step_choice, tracking, transfer
from finetune.checkpoints import (
    Progress,
    atomic_save,
    check_same_recipe,
    flat_config,
    full_state_dict,
    keep_only,
    latest_checkpoint,
    load_checkpoint,
    load_full_state_dict,
    prepare_output_dir,
    resume_point,
    rebuild_unsharded,
    skeleton,
)
from finetune.distill import make_distiller
from finetune.dropout import use_fast_dropout
from finetune.errors import FinetuneError
from finetune.loop import INTERRUPT, Training, evaluate_split, fit
from finetune.metrics import higher_is_better
from finetune.model import fold_target_scaling, interface_of
from finetune.model_folder import export_model
from finetune.optim import build_param_groups, build_scheduler, warmup_steps
from finetune.tasks import Job, get_task


def train(recipe, overwrite: bool = False, resume: bool = False,
          on_epoch: Callable[[int, dict], None] | None = None, evaluate_test: bool = True, plots: bool = True,
          checkpoints: bool = True) -> dict:
    """Fine-tune as the recipe says, write the run folder, return metrics.json's content.

    on_epoch(epoch, validation metrics): called after each epoch's checkpoint (a sweep reports to its pruner; an
    exception it raises, e.g. a pruned trial, leaves the run folder as that checkpoint and ends this run).
    evaluate_test: false leaves the test split unread (a sweep's trials must not see it).
    plots: false leaves the plots out of the run and model folders (a sweep draws them for its best trial only).
    checkpoints: false writes no resumable checkpoint (a sweep's trial is never resumed: a rerun starts new trials).

    resume: continue the unfinished run in output.dir from its newest checkpoint (exactly: same weights and metrics
    as a run never interrupted); with no checkpoint yet, start it again.
    """
    from accelerate.utils import set_seed

    timer = phases.Phases.for_run()
    timer.mark("imports and checks")
    t = recipe.train
    out = Path(recipe.output.dir)
    prepare_output_dir(out, overwrite, resume)
    # on a CPU, each step's activations reuse the pages the last step freed (the step choice measures with it too)
    memory_note = allocator.keep_freed_memory() if not torch.accelerator.is_available() else None
    # auto resumes at the precision the run started at (a checkpoint says which): resume stays exact
    kept, skipped = resume_point(out) if resume else (None, [])  # a damaged checkpoint: the newest whole one
    resumed = precision.of_checkpoint(kept)
    choice = _step_choice(recipe, kept, resumed)  # a convolutional model on a CPU: its fastest layout, precision
    if choice is not None and choice.how == "measured":
        timer.mark("choosing the step")
    mixed = choice.precision if choice is not None else precision.choose_precision(t.precision, resumed=resumed)
    accelerator = _make_accelerator(recipe, mixed)
    set_seed(t.seed)
    # data and model first: bad input fails here, before any run folder is made or removed
    job = _make_job(recipe, accelerator, choice, evaluate_test)
    say = _open_run_folder(accelerator, out, overwrite, recipe, resume)
    for line in skipped:
        say(line)
    _log_job(accelerator, out, job, memory_note, say)
    timer.mark("data and model")
    # contrastive: SetFit's first stage tunes the backbone before the head trains (finetune.contrastive)
    if (stage := contrastive.tune(job, recipe, accelerator, say, resume, checkpoints, INTERRUPT)) is not None:
        timer.mark("contrastive stage")
    eval_batch = t.eval_batch_size or 2 * t.batch_size
    depths = _set_what_trains(job, recipe, accelerator)
    _use_cached_features(job, recipe, accelerator, eval_batch, say)
    timer.mark("feature pass")  # the frozen backbone over every split, when features are cached
    if t.compile:
        job.model.compile()  # in place: parameter names (checkpoints, export) stay those of the plain model
    loaders = {
        key: job.make_loader(dataset, t.batch_size if key == "train" else eval_batch, key == "train")
        for key, dataset in job.datasets.items()
    }
    optimizer, scheduler = _optimizer_and_schedule(job.model, recipe, depths, len(loaders["train"]), accelerator)
    # sharded, the export needs a whole model on the main process: its skeleton (no storage) taken now, filled in
    # with the gathered weights at the end
    template = skeleton(job.model) if _sharding(accelerator) and accelerator.is_main_process else None
    model, optimizer, scheduler = accelerator.prepare(job.model, optimizer, scheduler)
    if not hasattr(scheduler, "scheduler"):  # not a torch LRScheduler (transformers' GreedyLR): accelerate left it
        accelerator.register_for_checkpointing(scheduler)  # as it was, and a resumed run needs its state too
    loaders = {key: accelerator.prepare(loader) for key, loader in loaders.items()}
    _start_logging(accelerator, model, job, recipe, choice, say)
    _checkpoint_only_what_trains(accelerator, model, job, recipe)
    ema = _make_ema(accelerator, model, t.ema)
    progress = _starting_progress(accelerator, model, kept, job, say)
    timer.mark("preparing")
    run = Training(accelerator, model, optimizer, scheduler, loaders, job, recipe, say, progress, ema)
    metrics = _fit(run, on_epoch, checkpoints)
    metrics["health"] = health.of_run(metrics["epochs"], job.splits)  # the card and `ls` show it too
    metrics.update(job.record)  # backbone.layers' kept layers, the teacher and its metrics
    metrics["train"]["precision"] = precision.name(accelerator.mixed_precision)  # predict runs at it too
    if choice is not None:
        metrics["train"]["step_choice"] = choice.record()
    if stage is not None:
        metrics["train"]["contrastive"] = stage
    timer.mark("training")
    _test_best(run, metrics)
    calibration.calibrate(run, metrics)  # eval.calibrate: the temperature export folds in, on the kept model
    timer.mark("test")
    if (line := health.warning(metrics["health"])) is not None:
        say(line)  # after the test line, as the run's last words before the saving and timing lines
    final = _model_to_export(run, template)
    calibration.fold_into(final, metrics)  # before the LoRA adapter is saved and merged: both hold the temperature
    if accelerator.is_main_process:
        _save_run(final, run, metrics, plots, timer)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it closes the trackers and the process group
    return metrics


def _sharding(accelerator) -> bool:
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")  # no process holds the whole model


def _make_accelerator(recipe, mixed: str):
    """Accelerate for the run: processes, precision, accumulation, trackers; EMA refused where it shards."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    t = recipe.train
    out = Path(recipe.output.dir)
    precision.allow_accelerator_at(mixed)
    accelerator = Accelerator(
        # without a GPU, accelerate only runs multi-process (torchrun, gloo) when told it is on the CPU
        cpu=not torch.accelerator.is_available(),
        mixed_precision=mixed,
        gradient_accumulation_steps=t.grad_accum,
        log_with=tracking.trackers(t.log_with, out),  # a missing tracker package fails here, before the run folder
        project_dir=str(out),
        # DDP registers the weights that train when it wraps the model; a schedule that unfreezes later needs them
        # all registered and the frozen ones skipped step by step
        kwargs_handlers=([DistributedDataParallelKwargs(find_unused_parameters=True)]
                         if transfer.has_freeze_schedule(recipe) else None),
    )
    if _sharding(accelerator) and t.ema is not None:
        raise FinetuneError(
            f"train.ema: not supported under {accelerator.distributed_type.value} (the average is a whole copy of the "
            "model on each process); set train.ema=null, or train with DDP (torchrun / accelerate launch without "
            "an FSDP or DeepSpeed config)"
        )
    return accelerator


def _make_job(recipe, accelerator, choice, evaluate_test: bool) -> Job:
    """The task's data and model, in the step choice's memory layout, with LoRA adapters and class weights."""
    job = get_task(recipe.task).job(recipe, accelerator)
    if choice is not None and choice.channels_last and not step_choice.is_channels_last(job.model):
        job.model = job.model.to(memory_format=torch.channels_last)
    if not evaluate_test:
        job.datasets.pop("test", None)
    if recipe.backbone.layers is not None:  # before LoRA, which wraps the layers that stay
        kept, total = interface_of(job.model).keep_layers(recipe.backbone.layers)
        job.record["backbone_layers"] = {"kept": kept, "of": total}
        job.notes.append(f"backbone.layers: kept {len(kept)} of the {total} pretrained layers: {kept}")
    job.distiller = make_distiller(recipe, job, accelerator.device)
    if recipe.lora is not None:
        job.model = transfer.apply_lora(job.model, recipe.lora)
    job.class_weights = _class_weights(recipe, job.splits, accelerator.device)
    return job


def _log_job(accelerator, out: Path, job: Job, memory_note: str | None, say) -> None:
    """split.json, and the data report's warnings and the set-up notes in the log."""
    if accelerator.is_main_process:
        (out / "split.json").write_text(json.dumps(job.splits.info, indent=1) + "\n")
    for warning in job.warnings:
        say(f"warning: {warning}")
    for note in job.notes + ([memory_note] if memory_note else []):
        say(note)


def _set_what_trains(job: Job, recipe, accelerator) -> dict[str, int]:
    """A fixed freeze, frozen word embeddings, gradient checkpointing, the CPU's fast dropout; returns the backbone's
    layer depths (for layer-wise lr decay)."""
    t = recipe.train
    depths, top = transfer.layer_ids(job.model)
    first_depth = transfer.trainable_depth(recipe, 1, top)
    if not transfer.has_freeze_schedule(recipe) and first_depth is not None:
        # a fixed freeze: frozen weights never reach the optimizer (or DDP)
        transfer.apply_freeze(job.model, first_depth, depths)
    if t.freeze_embeddings:
        transfer.freeze_word_embeddings(job.model)
    if t.gradient_checkpointing:
        transfer.enable_gradient_checkpointing(job.model)
    if accelerator.device.type == "cpu" and t.fast_dropout:
        use_fast_dropout(job.model)  # torch's CPU dropout masks cost ~40% of a text forward pass
    return depths


def _optimizer_and_schedule(model, recipe, depths: dict, batches: int, accelerator):
    """AdamW over the param groups (head lr, layer decay, no decay on biases and norms) and the lr schedule."""
    t = recipe.train
    head = transfer.optimizer_head_names(model)
    groups = build_param_groups(model, t.lr, t.head_lr, t.weight_decay, head, depths, t.layer_decay)
    optimizer = torch.optim.AdamW(groups, fused=True)  # one kernel for all tensors: ~10x faster steps than the loop
    # Steps as one process would count them: accelerate steps the scheduler once per process per optimizer step.
    # train.max_steps counts optimizer steps: the schedule spans them, as in the transformers Trainer
    total_steps = (math.ceil(batches / t.grad_accum) * t.epochs if t.max_steps is None
                   else t.max_steps * accelerator.num_processes)
    warmup = warmup_steps(t.warmup, total_steps) * (1 if isinstance(t.warmup, float) else accelerator.num_processes)
    direction = "max" if higher_is_better(recipe.eval.select_best) else "min"  # for a metric-driven schedule
    scheduler = build_scheduler(optimizer, t.scheduler, warmup, total_steps, t.scheduler_args,
                                accelerator.num_processes, direction)
    return optimizer, scheduler


def _start_logging(accelerator, model, job: Job, recipe, choice, say) -> None:
    """The trackers started with the recipe as their config; the run's sizes, precision and step choice said."""
    config = flat_config(recipe_module.to_dict(recipe))  # the recipe as each tracker's run config
    out = Path(recipe.output.dir)
    accelerator.init_trackers(recipe.train.log_project, config=config, init_kwargs=tracking.init_kwargs(out))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    sizes = " | ".join(f"{key} {len(dataset)}" for key, dataset in job.datasets.items())
    say(
        f"{sizes} examples; {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable "
        f"({100 * trainable / total:.2f}%); {accelerator.num_processes} process(es) on {accelerator.device}"
    )
    say(precision.describe(accelerator.mixed_precision, recipe.train.precision))
    if choice is not None:
        say(choice.describe())


def _checkpoint_only_what_trains(accelerator, model, job: Job, recipe) -> None:
    """The frozen weights never change: checkpoints hold only what trains (a LoRA or probe checkpoint is small, and
    an epoch of a cached probe is not dominated by writing the backbone again)."""
    if not (transfer.is_frozen_backbone(recipe) or recipe.lora is not None):
        return
    job.saved_names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    accelerator.register_save_state_pre_hook(
        lambda models, weights, _: [keep_only(w, job.saved_names) for w in weights]
    )


def _make_ema(accelerator, model, ema_recipe):
    """train.ema: timm's average of the weights, saved in checkpoints with the rest; None without it."""
    if ema_recipe is None:
        return None
    from timm.utils import ModelEmaV3

    # warmup: the decay ramps up over the first steps, so a short run's EMA is not stuck near random init
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=ema_recipe.decay, use_warmup=True)
    accelerator.register_for_checkpointing(ema)
    return ema


def _starting_progress(accelerator, model, checkpoint: Path | None, job: Job, say) -> Progress:
    """Where training starts: the state and progress of `checkpoint` when resuming from one."""
    progress = Progress()
    if checkpoint is not None:
        progress = load_checkpoint(accelerator, checkpoint, strict=job.saved_names is None)
        say(f"resumed from {checkpoint}: epoch {progress.epoch}, {progress.batch} batches in, step {progress.step}")
    progress.precision = accelerator.mixed_precision
    progress.channels_last = step_choice.is_channels_last(accelerator.unwrap_model(model))
    return progress


def _fit(run: Training, on_epoch, checkpoints: bool) -> dict:
    """The loop, stopped at a step boundary by Ctrl-C or SIGTERM (then saying how to resume)."""
    accelerator, out = run.accelerator, Path(run.recipe.output.dir)
    try:
        INTERRUPT.immediate = accelerator.num_processes > 1
        with INTERRUPT, transfer.threads_for_step(accelerator.unwrap_model(run.model), run.recipe.train.batch_size):
            return fit(run, on_epoch, checkpoints)
    except KeyboardInterrupt:
        kept = latest_checkpoint(out)
        if kept is not None:
            run.say(f"interrupted; {kept} holds the run so far: finetune run {out / 'config.yaml'} --resume")
        raise
    except Exception:
        if on_epoch is not None:  # a sweep goes on with its next trial in this process: close this run's trackers
            accelerator.end_training()
        raise


def _test_best(run: Training, metrics: dict) -> None:
    """The kept model: the best epoch's weights (raw or EMA) loaded and tested, its details into metrics."""
    from safetensors.torch import load_file

    accelerator, model, loaders, splits, recipe = run.accelerator, run.model, run.loaders, run.job.splits, run.recipe
    unwrapped = accelerator.unwrap_model(model)
    best_file = Path(recipe.output.dir) / "checkpoints" / "best" / "model.safetensors"
    # sharded: the main process reads the file and every process takes its shard of it (a collective)
    best = load_file(best_file) if accelerator.is_main_process or not _sharding(accelerator) else {}
    load_full_state_dict(unwrapped, best, strict=run.job.saved_names is None,
                         main_process=accelerator.is_main_process)
    del best
    details: dict = {}
    best_details = metrics.pop("best_details")
    if "test" in loaders:
        metrics["test"] = evaluate_split(accelerator, model, loaders["test"], splits, recipe, details, name="test")
        run.say("test " + " ".join(f"{k} {v:.4f}" for k, v in metrics["test"].items()))
    elif best_details.pop("evaluated", False):  # the best evaluation's own: the same weights on the same split
        details = best_details
        model.eval()
    else:  # the best evaluation ran before a resume
        evaluate_split(accelerator, model, loaders["validation"], splits, recipe, details)
    for value in details.values():
        value["split"] = "test" if "test" in loaders else "validation"
    metrics.update(details)


def _model_to_export(run: Training, template):
    """The plain model the main process exports (None on the others): gathered whole when sharded, the whole model
    of a cached-feature head, predicting in the targets' own units."""
    accelerator, recipe, splits = run.accelerator, run.recipe, run.job.splits
    final = accelerator.unwrap_model(run.model)
    if _sharding(accelerator):  # the whole weights gathered (every process takes part), a plain model built on main
        state = full_state_dict(run.model, accelerator)
        final = rebuild_unsharded(template, final, state) if accelerator.is_main_process else None
        del state
    if accelerator.is_main_process:
        final = interface_of(final).model_to_save()
    if accelerator.is_main_process and (scaling := problems.get(recipe.head.problem).target_scaling(splits)):
        fold_target_scaling(transfer.unwrap_lora(final), *scaling)
    return final


def _save_run(final, run: Training, metrics: dict, plots: bool, timer) -> None:
    """On the main process: the LoRA adapter, the model/ folder, metrics.json, and the push when asked."""
    recipe, say, out = run.recipe, run.say, Path(run.recipe.output.dir)
    if transfer.is_lora(final):  # the small file: adapters and head, for peft users
        atomic_save(out / "adapter", lambda d: final.save_pretrained(d))
        say(f"LoRA adapter saved to {out / 'adapter'}")
    final = transfer.merged(final)
    # a channels_last model (train.channels_last; the default for convolutions on a GPU) has non-contiguous
    # weights, which safetensors refuses to write: the exported model is in the default layout
    final = final.to(memory_format=torch.contiguous_format)
    splits = run.job.splits
    atomic_save(out / "model", lambda d: export_model(run.job.save, final, d, recipe, splits, metrics, plots))
    timer.mark("saving")
    metrics["train"].update(timer.report())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    say(f"model saved to {out / 'model'}; metrics in {out / 'metrics.json'}")
    say(timer.line())
    if recipe.hub.repo_id:
        _push(out, recipe, say)
    for line in where_to_look(out, recipe):
        say(line)


def where_to_look(out: Path, recipe) -> list[str]:
    """The run's last lines: its pictures, its curves, and the command that tries the model."""
    import shlex

    from finetune.tasks import get_task

    lines = []
    if (out / "plots").is_dir():
        lines.append(f"plots: {out / 'plots'}/ (also in the card, {out / 'model' / 'README.md'})")
    if "tensorboard" in recipe.train.log_with:
        lines.append(f"curves: tensorboard --logdir {shlex.quote(str(out / 'tensorboard'))}")
    # a pair model reads a table with both columns; a single input is a string or a file
    example = "pairs.csv" if recipe.data.text_pair_column else get_task(recipe.task).predict_example
    lines.append(f"try it: finetune predict {shlex.quote(str(out))} {example}")
    return lines


def _push(out: Path, recipe, say) -> None:
    """hub.repo_id: upload the finished run; a failed upload leaves the run as it is and says how to retry."""
    from finetune.hub import push_run

    try:
        say(f"pushed to {push_run(out, recipe.hub.repo_id, recipe.hub.private)}")
    except FinetuneError as error:
        visibility = "--private" if recipe.hub.private else "--public"
        say(f"warning: the run is saved, but the push failed: {error}; retry with: "
            f"finetune push {out} --repo-id {recipe.hub.repo_id} {visibility}")


def _step_choice(recipe, checkpoint: Path | None, resumed: str | None):
    """The measured layout and precision (finetune.step_choice) of a one-process CPU run whose task offers one; a
    resumed run keeps the checkpoint's (`resumed`: its precision). None where the recipe's own settings and rules
    decide."""
    import os

    task = get_task(recipe.task)
    one_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if not task.step_choice_applies or torch.accelerator.is_available() or not one_process:
        return None
    native = precision.cpu_has_native_bf16()
    if len(step_choice.candidates(recipe, native)) < 2:
        return None
    layout = precision.of_checkpoint(checkpoint, "channels_last")
    if layout is not None:
        return step_choice.StepChoice(resumed or "no", bool(layout), "resumed")
    return task.step_choice(recipe, native)


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


def _use_cached_features(job: Job, recipe, accelerator, eval_batch: int, say) -> None:
    """A frozen backbone without augmentation computes the same features every epoch: compute them once (cached on
    disk), and train the head alone on them. The job then holds feature data sets and a CachedHead model."""
    wanted = recipe.train.cache_features
    if wanted is False or not transfer.is_frozen_backbone(recipe):
        return
    features_fn = transfer.feature_function(job.model)
    why = None
    if job.augmenting:
        why = "augmentation changes the images every epoch (set augment.scale=[1,1], hflip=0 and the rest off)"
    elif features_fn is None:
        why = f"the head of {type(job.model).__name__} cannot be separated from its backbone (use head.pooling=mean)"
    elif recipe.train.ema is not None:
        why = "train.ema averages the whole model"
    elif job.distiller is not None:
        why = "distillation gives the teacher each batch's rows"
    if why:
        if wanted:
            raise FinetuneError(f"train.cache_features: cannot cache features: {why}")
        say(f"training through the frozen backbone, not on cached features: {why}")
        return
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
    job.model = transfer.CachedHead(model)
    say(f"training the head on cached features of the frozen backbone ({features['train'].shape[1]} per example)")


def _open_run_folder(accelerator, out: Path, overwrite: bool, recipe, resume: bool = False):
    """Create (or, with --overwrite, replace) the run folder; return the function that logs to it."""
    if resume and (out / "config.yaml").is_file():
        check_same_recipe(out / "config.yaml", recipe)
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
