#!/usr/bin/env python
"""Where a fine-tuning step of the kit spends its time, and what the candidate speed-ups change, measured.

    python scripts/profile_step.py [RECIPE] [key=value ...] [--steps 12] [--warmup 3] [--threads 2]
                                   [--variants base,frozen-embeddings,...] [--trace DIR] [--markdown FILE]

The step is the kit's own: the model from finetune.tasks.text_classification.model.build_text_model, the rows and tokens
from finetune.data (load_splits, tokenize, make_loader: shuffled, padded per batch), param groups from finetune.optim,
AdamW with fused=True, the schedule from finetune.optim.build_scheduler, everything through accelerate's prepare(), and
the kit's own step, finetune.loop.train_step (accumulate, forward, loss, backward, clip, step, schedule, zero_grad). An
image recipe's step is built from the image task's own job (finetune.tasks.image_classification: the timm model, the
datasets with their decoding and augmentation, the loader with the recipe's data.num_workers, mixup); its base is fp32
in the contiguous layout, the plain timm loop's step, and the kit's step choice (finetune.step_choice) picks among base,
channels-last, bf16 and bf16+channels-last. Each phase is timed with perf_counter (CPU ops are synchronous, so the split
is exact on a CPU):

  data       the prepared DataLoader's next batch (collation, padding; images: decoding and transforms, or the wait
             for the loader's workers)
  forward    model(**batch) and the loss
  backward   accelerator.backward(loss)
  optimizer  gradient clipping, optimizer.step(), scheduler.step(), zero_grad

Variants (each its own model and optimizer, all built up front; the steps are interleaved round-robin, so a change in
the machine's load hits every variant alike; medians of the measured steps are reported):

  base               as the kit does it today (the recipe's train.group_by_length; fast CPU dropout masks)
  frozen-embeddings  the word embeddings frozen (finetune.transfer.freeze_word_embeddings): no gradient for the
                     30522 x 384 table and no AdamW update of its 11.7M weights (half of MiniLM)
  foreach            AdamW(foreach=True) instead of fused=True
  compile            torch.compile of the model (model.compile(), as train.compile does); compile time reported
  one-thread         torch.set_num_threads(1) during its steps
  grouped            batches from finetune.sampling.LengthGroupedSampler (less padding), whatever the recipe says
  ungrouped          shuffled batches, not grouped by length, whatever the recipe says
  pad-max            every batch padded to data.max_length (what a loader without dynamic padding does)
  no-dropout         backbone.dropout=0 and head.dropout=0
  torch-dropout      torch's own dropout (a Bernoulli draw per activation) instead of finetune.dropout's masks
  bf16               the forward under torch.autocast("cpu", bfloat16), outputs back in fp32, as accelerate's
                     mixed_precision="bf16" (train.precision: auto on a CPU with native bf16) wraps it; fp32 weights

Image recipes only:

  channels-last      the model (and so its activations) in torch.channels_last
  no-augment         the training images through the evaluation transform (no random crop, flip or erasing)
  no-workers         data.num_workers=0: decoding and transforms in the training process, timed in the data phase
                     (the decoded images kept in memory: from the second epoch on only the transforms run)
  workers            data.num_workers=min(4, cores): worker processes, whatever the kit would choose (on a CPU
                     whose cores the step's threads all take, the kit reads in the process, as no-workers)

Text recipes only: frozen-embeddings, grouped, ungrouped, pad-max, torch-dropout.

Modifiers combine with "+": --variants base,ungrouped+torch-dropout,grouped+no-dropout.

A torch.profiler table of the base variant's top operators (self CPU time) is printed too; --trace DIR writes its
Chrome trace.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

ALL_VARIANTS = ("base", "frozen-embeddings", "foreach", "compile", "one-thread", "grouped", "ungrouped", "pad-max",
                "no-dropout", "torch-dropout", "bf16", "channels-last", "no-augment", "no-workers", "workers")
TEXT_ONLY = {"frozen-embeddings", "grouped", "ungrouped", "pad-max", "torch-dropout"}
IMAGE_ONLY = {"channels-last", "no-augment", "no-workers", "workers"}
PHASES = ("data", "forward", "backward", "optimizer")


@dataclass
class Variant:
    name: str
    model: object
    optimizer: object
    scheduler: object
    loader: object
    threads: int
    setup_seconds: float = 0.0
    times: dict = field(default_factory=lambda: {p: [] for p in PHASES})
    samples: list = field(default_factory=list)
    tokens: list = field(default_factory=list)  # real (unpadded) tokens per step
    padded: list = field(default_factory=list)  # tokens the model computes on, padding included
    iterator: object = None
    job: object = None  # an image variant's task job (its mixup, its splits)


def build_image(name: str, recipe, accelerator, threads: int) -> Variant:
    """An image recipe's variant: the model, datasets and loader of the image task's own job (decoding and
    transforms in the loader, as a run has them), fp32 and contiguous unless the variant says."""
    import torch

    from finetune import transfer
    from finetune.dropout import use_fast_dropout
    from finetune.optim import build_param_groups, build_scheduler
    from finetune.tasks import get_task

    t = recipe.train
    mods = set(name.split("+"))
    if "no-workers" in mods or "workers" in mods:
        workers = 0 if "no-workers" in mods else min(4, len(os.sched_getaffinity(0)))
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, num_workers=workers))
    torch.manual_seed(t.seed)
    job = get_task(recipe.task).job(recipe, accelerator)
    model = job.model.to(memory_format=torch.channels_last if "channels-last" in mods else torch.contiguous_format)
    dataset = job.datasets["train"]
    if "no-augment" in mods:  # the evaluation transform: decode, resize, centre crop, normalise
        dataset.transform = job.datasets["validation"].transform
        dataset.min_side = None
    loader = job.make_loader(dataset, t.batch_size, True)
    if t.fast_dropout and not torch.accelerator.is_available():
        use_fast_dropout(model)  # as finetune.train does on a CPU
    depths, _ = transfer.layer_ids(model)
    head = transfer.optimizer_head_names(model)
    groups = build_param_groups(model, t.lr, t.head_lr, t.weight_decay, head, depths, t.layer_decay)
    optimizer = torch.optim.AdamW(groups, foreach=True) if "foreach" in mods else torch.optim.AdamW(groups, fused=True)
    scheduler = build_scheduler(optimizer, t.scheduler, 0, math.ceil(len(loader) / t.grad_accum) * t.epochs)
    setup = 0.0
    if "compile" in mods:
        tic = time.perf_counter()
        model.compile()
        setup = time.perf_counter() - tic
    if "bf16" in mods:
        from accelerate.utils import convert_outputs_to_fp32

        model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    return Variant(name, model, optimizer, scheduler, loader, 1 if "one-thread" in mods else threads, setup, job=job)


def build(name: str, recipe, accelerator, splits, threads: int) -> Variant:
    import torch

    from finetune.tasks.text_classification import tokens as data_module
    from finetune import transfer
    from finetune.tasks.text_classification.model import build_text_model
    from finetune.optim import build_param_groups, build_scheduler
    from finetune.sampling import LengthGroupedSampler, token_lengths

    from finetune.dropout import use_fast_dropout

    t = recipe.train
    torch.manual_seed(t.seed)
    mods = set(name.split("+"))
    if "no-dropout" in mods:
        recipe = dataclasses.replace(recipe, backbone=dataclasses.replace(recipe.backbone, dropout=0.0),
                                     head=dataclasses.replace(recipe.head, dropout=0.0))
    model, tokenizer = build_text_model(recipe, splits.label_names)
    if recipe.lora is not None:  # as finetune.train does: peft adapters, the head trained in full
        model = transfer.apply_lora(model, recipe.lora)
    dataset = data_module.tokenize_texts(splits.train, tokenizer, recipe.data.max_length)
    loader = data_module.make_text_loader(dataset, tokenizer, t.batch_size, True, t.seed)
    if "grouped" in mods or (t.group_by_length and "ungrouped" not in mods and "pad-max" not in mods):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=t.batch_size, collate_fn=loader.collate_fn,
            sampler=LengthGroupedSampler(token_lengths(dataset), t.batch_size, t.seed))
    if "pad-max" in mods:
        from transformers import DataCollatorWithPadding

        loader = torch.utils.data.DataLoader(
            dataset, batch_size=t.batch_size, shuffle=True, generator=torch.Generator().manual_seed(t.seed),
            collate_fn=DataCollatorWithPadding(tokenizer, padding="max_length", max_length=recipe.data.max_length))
    if "frozen-embeddings" in mods:
        transfer.freeze_word_embeddings(model)
    if "torch-dropout" not in mods and not torch.accelerator.is_available():
        use_fast_dropout(model)  # as finetune.train does on a CPU
    depths, _ = transfer.layer_ids(model)
    groups = build_param_groups(model, t.lr, t.head_lr, t.weight_decay, transfer.optimizer_head_names(model), depths,
                                t.layer_decay)
    optimizer = torch.optim.AdamW(groups, foreach=True) if "foreach" in mods else torch.optim.AdamW(groups, fused=True)
    total = math.ceil(len(loader) / t.grad_accum) * t.epochs
    scheduler = build_scheduler(optimizer, t.scheduler, 0, total)
    setup = 0.0
    if "compile" in mods:
        tic = time.perf_counter()
        model.compile()
        setup = time.perf_counter() - tic  # compiling itself happens at the first steps: see the warmup line
    if "bf16" in mods:
        from accelerate.utils import convert_outputs_to_fp32

        model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    return Variant(name, model, optimizer, scheduler, loader, 1 if "one-thread" in mods else threads, setup)


def step(v: Variant, accelerator, recipe, record: bool) -> None:
    import torch

    from finetune import transfer
    from finetune.loop import train_step

    torch.set_num_threads(v.threads)
    v.model.train()
    transfer.freeze_modes(v.model)  # as finetune.train: wholly frozen modules (LoRA's) run in eval mode
    tic = time.perf_counter()
    try:
        batch = next(v.iterator)
    except (StopIteration, TypeError):
        v.iterator = iter(v.loader)
        batch = next(v.iterator)
    got = time.perf_counter()
    marks = {}
    # what train_step asks of the run's job: an image variant has its task's own (mixup)
    job = v.job or types.SimpleNamespace(mixup=None, class_weights=None)
    batch_size = len(batch["labels"])
    train_step(accelerator, v.model, v.optimizer, v.scheduler, batch, job, recipe,
               on_phase=lambda name: marks.__setitem__(name, time.perf_counter()))
    forward, backward = marks["forward"], marks["backward"]
    done = time.perf_counter()
    if record:
        for phase, seconds in zip(PHASES, (got - tic, forward - got, backward - forward, done - backward)):
            v.times[phase].append(seconds)
        v.samples.append(batch_size)
        mask = batch.get("attention_mask")  # images: nothing pads
        v.tokens.append(int(mask.sum()) if mask is not None else batch_size)
        v.padded.append(mask.numel() if mask is not None else batch_size)


def profile_base(v: Variant, accelerator, recipe, steps: int, trace: str | None) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            step(v, accelerator, recipe, record=False)
    if trace:
        Path(trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(trace) / "base_step_trace.json"))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="profile_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("args", nargs="*", metavar="RECIPE key=value")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per variant (default 12)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compile happens here)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPUs)")
    parser.add_argument("--variants", default=None,
                        help=f"from {', '.join(ALL_VARIANTS)} (default: every one that applies to the recipe)")
    parser.add_argument("--profile-steps", type=int, default=4, help="base steps under torch.profiler (0: none)")
    parser.add_argument("--trace", default=None, help="write the profiler's Chrome trace into this folder")
    parser.add_argument("--markdown", default=None, help="write the results into this Markdown file (a section)")
    parser.add_argument("--name", default="profile-step", help="the section's name in the Markdown file")
    args = parser.parse_args(argv)
    positional = list(args.args)
    recipe_arg = positional.pop(0) if positional and "=" not in positional[0] else "text/minilm-bbc-news"
    overrides = positional
    names = [n for n in (args.variants or ",".join(ALL_VARIANTS)).split(",") if n]
    unknown = {m for n in names for m in n.split("+")} - set(ALL_VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    threads = args.threads or len(os.sched_getaffinity(0))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from accelerate import Accelerator

    from finetune.tasks.text_classification.reading import load_text_splits as load_splits
    from finetune.precision import cpu_flags
    from finetune.recipe import find_recipe, load_recipe

    torch.set_num_threads(threads)
    if not torch.accelerator.is_available():  # as finetune.train does: the kit's step, with its allocator setting
        from finetune import allocator

        allocator.keep_freed_memory()
    recipe = load_recipe(find_recipe(recipe_arg), overrides)
    if recipe.task not in ("text-classification", "image-classification"):
        parser.error(f"profile_step.py profiles text and image classification, not {recipe.task}")
    image = recipe.task == "image-classification"
    if args.variants is None:
        names = [n for n in names if n not in (TEXT_ONLY if image else IMAGE_ONLY)]
    wrong = {m for n in names for m in n.split("+")} & (TEXT_ONLY if image else IMAGE_ONLY)
    if wrong:
        parser.error(f"--variants: {', '.join(sorted(wrong))} only for {'text' if image else 'image'} recipes")
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    splits = None if image else load_splits(recipe)
    variants = []
    for name in names:
        tic = time.perf_counter()
        variants.append(build_image(name, recipe, accelerator, threads) if image
                        else build(name, recipe, accelerator, splits, threads))
        print(f"built {name} in {time.perf_counter() - tic:.1f}s", file=sys.stderr, flush=True)
    warm = {}
    for i in range(args.warmup):
        for v in variants:
            tic = time.perf_counter()
            step(v, accelerator, recipe, record=False)
            warm.setdefault(v.name, []).append(time.perf_counter() - tic)
    load = []
    for i in range(args.steps):
        load.append(os.getloadavg()[0])
        for v in variants:
            step(v, accelerator, recipe, record=True)
        print(f"round {i + 1}/{args.steps}", file=sys.stderr, flush=True)
    table = None
    if args.profile_steps and variants and variants[0].name == "base":
        table = profile_base(variants[0], accelerator, recipe, args.profile_steps, args.trace)

    base = variants[0] if variants and variants[0].name == "base" else None
    # medians resist a neighbour's burst that hits a few steps; the mean shows it: an effect is real when both agree
    header = ["variant", "median step s", *[f"{p} s" for p in PHASES], "padding %", "samples/s", "vs base (median)",
              "vs base (mean)"]

    def step_times(v: Variant) -> list[float]:
        return [sum(v.times[p][i] for p in PHASES) / v.samples[i] for i in range(len(v.samples))]  # s per sample

    rows = []
    for v in variants:
        medians = {p: statistics.median(v.times[p]) for p in PHASES}
        total = statistics.median([sum(v.times[p][i] for p in PHASES) for i in range(len(v.samples))])
        padding = 100 * (1 - sum(v.tokens) / sum(v.padded))
        speed = sum(v.samples) / sum(sum(v.times[p]) for p in PHASES)  # what a run's samples/s would be
        ratios = ["-", "-"]
        if base is not None:
            ratios = [f"{statistics.median(step_times(base)) / statistics.median(step_times(v)):.2f}x",
                      f"{statistics.mean(step_times(base)) / statistics.mean(step_times(v)):.2f}x"]
        rows.append([v.name, f"{total:.3f}", *[f"{medians[p]:.3f}" for p in PHASES], f"{padding:.0f}", f"{speed:.1f}",
                     *ratios])
    shape = (f"image size {recipe.data.image_size}, {len(variants[0].job.splits.train['label'])} training images"
             if image else f"max_length {recipe.data.max_length}, {len(splits.train['text'])} training rows")
    notes = [f"{recipe_arg} {' '.join(overrides)}: batch {recipe.train.batch_size}, {shape}, {threads} threads, "
             f"CPU flags {cpu_flags()}; "
             f"{args.steps} measured steps per variant after {args.warmup} warmup steps, interleaved; medians",
             f"load average during the measured rounds: {min(load):.1f}-{max(load):.1f} on "
             f"{len(os.sched_getaffinity(0))} cores"]
    if image:
        from finetune.step_choice import is_channels_last

        notes.append("layouts: " + ", ".join(
            f"{v.name} {'channels_last' if is_channels_last(accelerator.unwrap_model(v.model)) else 'contiguous'}"
            for v in variants))
    for v in variants:
        if "compile" in v.name.split("+"):
            notes.append(f"compile: warmup steps took {', '.join(f'{s:.1f}' for s in warm[v.name])} s "
                         f"(compilation happens in the first steps) vs base "
                         f"{', '.join(f'{s:.1f}' for s in warm.get('base', []))} s")
    widths = [max(len(r[i]) for r in [header, *rows]) + 2 for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print(row[0].ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(row[1:], widths[1:])))
    for note in notes:
        print(f"note: {note}")
    if table:
        print("\nbase step, torch.profiler, top operators by self CPU time:\n" + table)
    if args.markdown:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench import write_markdown

        text = [f"### {args.name}", "", f"`python scripts/profile_step.py {' '.join(argv)}`", ""]
        text.append("| " + " | ".join(header) + " |")
        text.append("|---|" + "---:|" * (len(header) - 1))
        text += ["| " + " | ".join(r) + " |" for r in rows]
        text += [""] + [f"- {n}" for n in notes]
        if table:
            text += ["", "Top operators of the base step (torch.profiler, self CPU time):", "", "```", table, "```"]
        write_markdown(Path(args.markdown), args.name, "\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
