#!/usr/bin/env python
"""Benchmark the kit against the transformers Trainer on the same text fine-tuning job.

    python scripts/bench_text.py RECIPE [key=value ...] [--kit-only | --trainer-only] [--out results.json]
                                 [--threads N] [--repeat N] [--trainer-optim NAME] [--workdir DIR] [--keep] [--verbose]

Both sides run in their own child process of this same Python, with the same torch thread count
(OMP_NUM_THREADS / MKL_NUM_THREADS and torch.set_num_threads), so that wall time and peak memory compare:

  kit      `python -m finetune run RECIPE key=value ... output.dir=WORKDIR/kit`; metrics.json and split.json are read
           back, and the exported model/ is scored again on the test rows here (a check of the export).
  Trainer  this script in worker mode: the same recipe and overrides through `finetune.recipe.load_recipe` +
           `finetune.data.load_splits` (deterministic: the same rows as the kit run, checked against its split.json),
           the same backbone as `AutoModelForSequenceClassification` (num_labels, id2label, the recipe's dropouts),
           the same max_length, batch sizes, epochs, lr, weight decay, warmup (as steps, computed as the kit does),
           scheduler, grad_accum, max_grad_norm, seed, precision (the kit's own choice for this machine), dynamic
           padding (DataCollatorWithPadding), evaluation every epoch and load_best_model_at_end on eval.select_best.
           Nothing else is tuned: the optimizer is the Trainer's default for this torch (see the output) and the
           Trainer has no head learning rate, so train.lr is used for every parameter even when the recipe sets
           train.head_lr (pass train.head_lr=null to give the kit the same single lr).

Speed: "train samples/s" is training samples over time spent in the training loop only, for both sides: the kit's
metrics.json `train.samples_per_second`, and for the Trainer the time between each epoch's on_epoch_begin and
on_epoch_end callbacks (forward, backward, optimizer, scheduler, data loading; per-epoch evaluation and checkpoint
saving come after on_epoch_end and are excluded, as in the kit). The Trainer's own `train_samples_per_second`, which
also counts its per-epoch evaluation and checkpoint saving, is reported beside it. Wall seconds are each child
process's whole life (imports, data, tokenisation, training, evaluation, test, export).

Timings on a shared machine swing several-fold with other processes' load (2 cores here). Each run records the CPU
seconds of its process and how many threads other processes kept runnable meanwhile ("other processes' runnable
threads"); above ~0.5 the speed numbers say more about the neighbours than about the code, and a note says so.
--repeat N runs each side N times, alternating which goes first, and reports the best speed of each.

Test accuracy and f1_macro are computed with scikit-learn on argmax predictions of the best epoch's model.

The last line printed is the whole result as one JSON object; --out also writes it (indented) to a file.
Only single-label classification recipes are supported (accuracy / f1_macro are the point of the comparison).
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

WORKER_FLAG = "--_trainer-worker"


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


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


def load_job(recipe_arg: str, overrides: list[str]):
    from finetune.data import load_splits
    from finetune.recipe import find_recipe, load_recipe

    recipe = load_recipe(find_recipe(recipe_arg), overrides)
    if recipe.task != "text-classification" or recipe.head.problem != "single_label":
        raise SystemExit("bench_text: only text-classification recipes with head.problem=single_label are supported")
    return recipe, load_splits(recipe)


def warmup_steps_like_kit(recipe, n_train: int) -> tuple[int, int]:
    """(warmup steps, total optimizer steps) exactly as finetune.train computes them for one process."""
    t = recipe.train
    total = math.ceil(math.ceil(n_train / t.batch_size) / t.grad_accum) * t.epochs
    warmup = math.ceil(t.warmup * total) if isinstance(t.warmup, float) else int(t.warmup)
    return warmup, total


# ---------------------------------------------------------------------------------------------------------------
# The Trainer side (runs in a child process: `bench_text.py --_trainer-worker RESULT.json RECIPE overrides...`)


def trainer_worker(result_path: str, recipe_arg: str, overrides: list[str], threads: int, optim: str | None) -> None:
    start = time.perf_counter()
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
    from finetune.metrics import compute_metrics
    from finetune.train import choose_precision

    set_threads(threads)
    transformers.logging.set_verbosity_warning()
    recipe, splits = load_job(recipe_arg, overrides)
    t, d = recipe.train, recipe.data
    out = Path(result_path).parent / "trainer"
    shutil.rmtree(out, ignore_errors=True)

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

    train_ds = tokenize(splits.train, tokenizer, d.max_length)
    val_ds = tokenize(splits.validation, tokenizer, d.max_length)
    test_ds = tokenize(splits.test, tokenizer, d.max_length) if splits.test is not None else None
    train_tokens = int(sum(len(ids) for ids in train_ds["input_ids"]))
    warmup, total_steps = warmup_steps_like_kit(recipe, len(train_ds))
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

    kwargs = {} if optim is None else {"optim": optim}
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
    notes = []
    if t.early_stopping is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping.patience))
        if t.early_stopping.metric != select:
            notes.append(
                f"the Trainer's early stopping watches {select} (metric_for_best_model), the kit's "
                f"{t.early_stopping.metric}"
            )
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
            epochs.append(
                {
                    "epoch": round(entry["epoch"]),
                    "validation": {k[len("eval_"):]: v for k, v in entry.items() if k.startswith("eval_")
                                   and k[len("eval_"):] in ["loss", *recipe.eval.metrics]},
                }
            )
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
    result = {
        "rows": {key: (splits.info["splits"][key]["rows"] if key in splits.info["splits"] else None)
                 for key in ("train", "validation", "test")},
        "labels": names,
        "n": {"train": len(train_ds), "validation": len(val_ds), "test": len(test_ds) if test_ds is not None else 0},
        "train_tokens_per_epoch": train_tokens,
        "warmup_steps": warmup,
        "total_steps": total_steps,
        "precision": {"no": "fp32"}.get(precision, precision),
        "optimizer": optimizer_name,
        "threads": torch.get_num_threads(),
        "device": str(trainer.args.device),
        "trainer": {
            "test": test,
            "train_samples_per_second": samples / timer.seconds if timer.seconds else 0.0,
            "train_seconds": timer.seconds,
            "train_samples": samples,
            "train_tokens_per_second": train_tokens * timer.epochs / timer.seconds if timer.seconds else 0.0,
            "trainer_train_samples_per_second": train_output.metrics.get("train_samples_per_second"),
            "trainer_train_runtime": train_output.metrics.get("train_runtime"),
            "epochs_run": timer.epochs,
            "best_epoch": best_epoch,
            "epochs": epochs,
            "peak_memory_mb": peak_memory_mb(),
            "seconds_in_worker": time.perf_counter() - start,
            "notes": notes,
        },
    }
    Path(result_path).write_text(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The kit side


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


def rescore_kit_model(model_dir: Path, test_table: dict, max_length: int, batch_size: int) -> dict:
    """Score the exported model/ on the test rows here: does what was shipped match metrics.json?"""
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
    return sk_scores(np.asarray(test_table["label"]), np.concatenate(predictions))


# ---------------------------------------------------------------------------------------------------------------
# Report


def fmt(value, spec=".4f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def print_table(result: dict) -> None:
    kit, trainer = result.get("kit"), result.get("trainer")
    job = result["job"]
    print()
    print(f"recipe {result['recipe']} {' '.join(result['overrides'])}")
    print(
        f"train/validation/test rows {job['n']['train']}/{job['n']['validation']}/{job['n']['test']} | "
        f"max_length {job['max_length']} | batch {job['batch_size']} | epochs {job['epochs']} | lr {job['lr']} "
        f"(kit head_lr {job['head_lr']}, Trainer: lr for all) | wd {job['weight_decay']} | {job['scheduler']}, "
        f"warmup {job['warmup_steps']}/{job['total_steps']} steps | seed {job['seed']} | {job['precision']} | "
        f"{job['threads']} threads | {job['device']} | Trainer optim {job['optimizer']}"
    )
    rows = [
        ("test accuracy", lambda s: s["test"] and s["test"]["accuracy"], ".4f"),
        ("test f1_macro", lambda s: s["test"] and s["test"]["f1_macro"], ".4f"),
        ("best epoch", lambda s: s["best_epoch"], "d"),
        ("train samples/s (loop only)", lambda s: s["train_samples_per_second"], ".2f"),
        ("train tokens/s (unpadded)", lambda s: s.get("train_tokens_per_second"), ".0f"),
        ("train loop seconds", lambda s: s["train_seconds"], ".1f"),
        ("Trainer's own samples/s (incl. eval+save)", lambda s: s.get("trainer_train_samples_per_second"), ".2f"),
        ("wall seconds (whole process)", lambda s: s["wall_seconds"], ".1f"),
        ("CPU seconds (whole process)", lambda s: s["cpu_seconds"], ".1f"),
        ("peak memory MB", lambda s: s["peak_memory_mb"], ".0f"),
        ("other processes' runnable threads", lambda s: s.get("other_runnable_threads"), ".1f"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print()
    print(f"{'':{width}}{'kit':>12}{'Trainer':>12}{'kit/Trainer':>13}")
    for label, get, spec in rows:
        a = get(kit) if kit else None
        b = get(trainer) if trainer else None
        ratio = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b and label.startswith(
            ("train samples", "train tokens", "wall", "CPU", "peak")) else None
        print(f"{label:{width}}{fmt(a, spec):>12}{fmt(b, spec):>12}{fmt(ratio, '.2f'):>13}")
    if kit and kit.get("test_rescored"):
        r = kit["test_rescored"]
        print(f"{'kit model/ re-scored here':{width}}{fmt(r['accuracy']):>12}  (accuracy), {fmt(r['f1_macro'])} (f1_macro)")
    for side in ("kit", "trainer"):
        if result.get(side):
            shown = "; ".join(
                f"{e['epoch']}: loss {fmt(e.get('loss'))} val "
                + " ".join(f"{k} {fmt(v)}" for k, v in e["validation"].items() if k != "loss")
                for e in result[side]["epochs"]
            )
            print(f"{side} epochs  {shown}")
    if result.get("speed_ratio") is not None:
        print(f"\nspeed kit/Trainer (training samples/s, loop only): {result['speed_ratio']:.2f}x")
    for note in result["notes"]:
        print(f"note: {note}")


# ---------------------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str]) -> int:
    if argv and argv[0] == WORKER_FLAG:
        result_path, threads, optim, recipe_arg, *overrides = argv[1:]
        trainer_worker(result_path, recipe_arg, overrides, int(threads), optim or None)
        return 0

    parser = argparse.ArgumentParser(prog="bench_text.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe file or built-in name")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for both sides")
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--kit-only", action="store_true")
    side.add_argument("--trainer-only", action="store_true")
    parser.add_argument("--out", help="also write the result JSON (indented) here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: usable CPUs)")
    parser.add_argument("--trainer-optim", default=None, help="TrainingArguments.optim (default: the Trainer's own)")
    parser.add_argument("--workdir", default=None, help="where run folders go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--repeat", type=int, default=1, help="run each side N times, alternating the order; report "
                        "the best speed of each (default 1)")
    parser.add_argument("--verbose", action="store_true", help="show the children's output instead of logging it")
    args = parser.parse_args(argv)

    overrides = [o for o in args.overrides if not o.startswith("output.dir=")]
    if len(overrides) != len(args.overrides):
        print("bench_text: ignoring output.dir=...: the benchmark chooses its own run folders", file=sys.stderr)
    threads = args.threads or len(os.sched_getaffinity(0))
    os.environ.update(child_env(threads))  # this process scores the kit's model: same threads, offline too
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_text-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = child_env(threads)
    notes: list[str] = []
    result: dict = {"recipe": args.recipe, "overrides": overrides, "kit": None, "trainer": None, "notes": notes}

    from finetune.recipe import find_recipe, load_recipe

    recipe = load_recipe(find_recipe(args.recipe), overrides)  # fail fast on a bad recipe, before any training
    t = recipe.train
    if recipe.head.problem != "single_label":
        print("bench_text: only head.problem=single_label is supported", file=sys.stderr)
        return 2

    kit_dir = workdir / "kit"

    def run_kit(i: int) -> dict | None:
        shutil.rmtree(kit_dir, ignore_errors=True)
        command = [sys.executable, "-m", "finetune", "run", args.recipe, *overrides, f"output.dir={kit_dir}"]
        log = workdir / f"kit{i}.log"
        print(f"kit: {' '.join(command[2:])}  (log {log})", file=sys.stderr, flush=True)
        run = run_child(command, env, log, args.verbose)
        if run["code"] != 0:
            print(f"bench_text: the kit run failed (exit {run['code']}):\n{tail(log)}", file=sys.stderr)
            return None
        metrics = json.loads((kit_dir / "metrics.json").read_text())
        print(f"kit: done in {run['wall_seconds']:.0f}s", file=sys.stderr, flush=True)
        return {
            "test": {k: metrics["test"][k] for k in ("accuracy", "f1_macro") if k in metrics.get("test", {})} or None,
            "train_samples_per_second": metrics["train"]["samples_per_second"],
            "train_seconds": metrics["train"]["seconds"],
            "train_samples": metrics["train"]["samples"],
            "best_epoch": metrics["best"]["epoch"],
            "epochs": metrics["epochs"],
            "peak_memory_mb": metrics["train"]["peak_memory_mb"],
            **{k: v for k, v in run.items() if k != "code"},
        }

    def run_trainer(i: int) -> dict | None:
        result_path = workdir / "trainer.json"
        command = [sys.executable, os.path.abspath(__file__), WORKER_FLAG, str(result_path), str(threads),
                   args.trainer_optim or "", args.recipe, *overrides]
        log = workdir / f"trainer{i}.log"
        print(f"Trainer: worker process  (log {log})", file=sys.stderr, flush=True)
        run = run_child(command, env, log, args.verbose)
        if run["code"] != 0:
            print(f"bench_text: the Trainer run failed (exit {run['code']}):\n{tail(log)}", file=sys.stderr)
            return None
        print(f"Trainer: done in {run['wall_seconds']:.0f}s", file=sys.stderr, flush=True)
        return json.loads(result_path.read_text()) | {k: v for k, v in run.items() if k != "code"}

    # alternate the order on each repeat, so that a change in the machine's load hits both sides alike
    sides = [] if args.trainer_only else ["kit"]
    sides += [] if args.kit_only else ["trainer"]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(args.repeat):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            got = run_kit(i) if side == "kit" else run_trainer(i)
            if got is None:
                return 1
            runs[side].append(got)
    speed_keys = ("train_samples_per_second", "train_seconds", "wall_seconds", "cpu_seconds", "load_before", "load_after",
                  "other_runnable_threads")
    split = json.loads((kit_dir / "split.json").read_text()) if "kit" in runs else None
    job = None
    if "kit" in runs:
        result["kit"] = runs["kit"][0] | {"runs": [{k: r[k] for k in speed_keys} for r in runs["kit"]]}
    if "trainer" in runs:
        job = runs["trainer"][0]
        result["trainer"] = job.pop("trainer") | {k: job.pop(k) for k in list(job) if k in speed_keys}
        for r in runs["trainer"][1:]:
            r.update(r.pop("trainer"))
        result["trainer"]["runs"] = [{k: result["trainer"][k] for k in speed_keys}] + [
            {k: r[k] for k in speed_keys} for r in runs["trainer"][1:]]
        notes.extend(result["trainer"].pop("notes"))
    for side in ("kit", "trainer"):
        if result[side] is not None and len(result[side]["runs"]) > 1:  # best of N: the least disturbed run
            best = max(result[side]["runs"], key=lambda r: r["train_samples_per_second"])
            result[side].update({k: best[k] for k in ("train_samples_per_second", "train_seconds", "other_runnable_threads")})
            result[side]["wall_seconds"] = min(r["wall_seconds"] for r in result[side]["runs"])
            result[side]["cpu_seconds"] = min(r["cpu_seconds"] for r in result[side]["runs"])
    if args.repeat > 1:
        notes.append(f"speed, wall and CPU seconds are the best of {args.repeat} runs per side (order alternated); "
                     "accuracy is from the first run (same seed, same result)")

    # the same rows on both sides, and the kit's exported model scored here
    import torch

    torch.set_num_threads(threads)
    from finetune.data import load_splits

    splits = load_splits(recipe)
    if result["kit"] is not None:
        for key in ("train", "validation", "test"):
            ours = splits.info["splits"].get(key, {}).get("rows")
            theirs = split["splits"].get(key, {}).get("rows")
            if ours != theirs:
                raise SystemExit(f"bench_text: the {key} rows differ from the kit's split.json; not the same job")
        if split["labels"] != splits.label_names:
            raise SystemExit("bench_text: the label order differs from the kit's split.json")
        if job is not None and job["rows"] != {k: splits.info["splits"].get(k, {}).get("rows") for k in job["rows"]}:
            raise SystemExit("bench_text: the Trainer worker's rows differ from the kit's; not the same job")
        notes.append("train/validation/test rows and label order checked identical to the kit's split.json")
        if splits.test is not None and (kit_dir / "model").is_dir():
            result["kit"]["test_rescored"] = rescore_kit_model(
                kit_dir / "model", splits.test, recipe.data.max_length, t.eval_batch_size or 2 * t.batch_size
            )
    warmup, total = warmup_steps_like_kit(recipe, len(splits.train["text"]))
    from transformers import AutoTokenizer

    from finetune.backbones import resolve_text_source

    counter = AutoTokenizer.from_pretrained(resolve_text_source(recipe.backbone.name))
    train_tokens = sum(len(ids) for ids in counter(list(splits.train["text"]), truncation=True,
                                                   max_length=recipe.data.max_length)["input_ids"])
    if result["kit"] is not None and result["kit"]["train_seconds"]:
        epochs_run = len(result["kit"]["epochs"])
        result["kit"]["train_tokens_per_second"] = train_tokens * epochs_run / result["kit"]["train_seconds"]
    from finetune.train import choose_precision

    result["job"] = {
        "n": {k: len(v["text"]) if v is not None else 0 for k, v in
              (("train", splits.train), ("validation", splits.validation), ("test", splits.test))},
        "max_length": recipe.data.max_length,
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
        "seed": t.seed,
        "precision": {"no": "fp32"}.get(choose_precision(t.precision), choose_precision(t.precision)),
        "threads": threads,
        "device": job["device"] if job else ("cuda" if torch.cuda.is_available() else "cpu"),
        "optimizer": job["optimizer"] if job else None,
        "train_tokens_per_epoch": train_tokens,
    }
    if t.head_lr is not None and t.head_lr != t.lr:
        notes.append(
            f"the kit trains the head at train.head_lr={t.head_lr} and the backbone at {t.lr}; the Trainer has no head lr "
            f"and uses {t.lr} for everything (pass train.head_lr=null for a like-for-like optimizer)"
        )
    if job and job["optimizer"] != "adamw_torch":
        notes.append(
            f"the Trainer's optimizer is {job['optimizer']}; the kit builds torch.optim.AdamW with torch's default "
            "implementation (on CPU the per-tensor loop, several times slower per step than the fused kernel); pass "
            "--trainer-optim adamw_torch for the same optimizer on both sides"
        )
    if recipe.head.type != "linear" or recipe.head.pooling != "auto":
        notes.append("the recipe's head is not the native linear head on the pooled output; the Trainer side uses the "
                     "native AutoModelForSequenceClassification head")
    if recipe.lora is not None:
        notes.append("the recipe sets lora; the Trainer side fine-tunes every weight")
    if result["kit"] and result["trainer"] and result["trainer"]["train_samples_per_second"]:
        result["speed_ratio"] = result["kit"]["train_samples_per_second"] / result["trainer"]["train_samples_per_second"]
        result["wall_ratio"] = result["kit"]["wall_seconds"] / result["trainer"]["wall_seconds"]
    else:
        result["speed_ratio"] = result["wall_ratio"] = None
    busy = [result[side]["other_runnable_threads"] for side in ("kit", "trainer")  # of the runs whose speed is shown
            if result[side] and result[side].get("other_runnable_threads") is not None]
    result["other_runnable_threads_max"] = max(busy) if busy else None
    if busy and max(busy) > 0.5:
        notes.append(
            f"the machine was busy: other processes kept up to {max(busy):.1f} threads runnable on average during a shown run "
            f"({os.cpu_count()} CPUs, {threads} threads here); speed and wall numbers are unreliable, rerun on a quiet "
            "machine or with --repeat 3"
        )
    notes.append(
        "train samples/s counts the training loop only on both sides (kit: metrics.json; Trainer: on_epoch_begin..."
        "on_epoch_end); the Trainer's own train_samples_per_second also includes its per-epoch eval and checkpoint saves"
    )

    print_table(result)
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
