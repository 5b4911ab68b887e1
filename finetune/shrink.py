"""`finetune shrink`: a trained run distilled into shallower students, each exported, and every model timed the way it
is served (the teacher's and students' native library, onnxruntime for the exports) on the same test inputs."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from finetune.errors import FinetuneError

SHRINK_HELP = (
    "distil a run into smaller students and time them against it",
    "Distils the run (the teacher) into a student per --layers size: the run's own recipe with backbone.layers=N and "
    "distill.teacher=RUN (--data: distill.unlabeled, inputs the teacher labels softly). Each student is exported to "
    "ONNX fp32 (and int8 with --int8) and every model is scored on the test split and timed on the same test inputs: "
    "batch-1 p50/p99 latency after warm-up calls, batch-32 throughput, size on disk; the teacher as its library serves "
    "it (transformers.pipeline, timm). Writes shrink.json and shrink.png (metric against latency) under --output; the "
    "run folder is only read.",
    "  finetune shrink runs/minilm-sentiment --int8\n  finetune shrink runs/my --layers 3 --data unlabelled.txt "
    "--output runs/my-small",
)
WARMUP = 3  # untimed calls per model and batch size: the first ones allocate, plan and fill caches
ROUNDS = 2  # the models take turns this many times; throughput is each model's best round


def shrink_verb(parser) -> None:
    """The verb's arguments and command (cli.py makes its parser with SHRINK_HELP)."""
    parser.add_argument("run", help="the trained run folder (the teacher); it is read, never written")
    parser.add_argument("--layers", default="4,3,2", help="student depths, comma-separated (default: %(default)s)")
    parser.add_argument("--int8", action="store_true", help="also export and time each student's int8 ONNX")
    parser.add_argument("--data", default=None, help="inputs without labels for the teacher to label "
                        "(distill.unlabeled: a .txt, a table with the input column, a folder of images)")
    parser.add_argument("--output", default=None, help="where the students go (default: RUN/../<run name>-shrink)")
    parser.add_argument("--calls", type=int, default=50, help="timed batch-1 calls per model (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print shrink.json instead of the table")
    parser.set_defaults(func=run_shrink)


def run_shrink(args) -> int:
    """The verb: shrink, then the table (or the JSON) on stdout."""
    from finetune import allocator

    layers = _layer_list(args.layers)
    if args.calls < 1:
        raise FinetuneError(f"--calls: {args.calls} timed calls measure nothing; give 1 or more (default 50)")
    allocator.keep_freed_memory()  # as every CLI verb that runs models on the CPU (cli._keep_freed_memory)
    report = shrink(args.run, layers, int8=args.int8, data=args.data, output=args.output, calls=args.calls)
    print(json.dumps(report, indent=1) if args.json else table(report))
    return 0


def _layer_list(text: str) -> list[int]:
    try:
        layers = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        layers = []
    if not layers or min(layers) < 1:
        raise FinetuneError(f"--layers: '{text}' is not a comma-separated list of depths such as 4,3,2")
    return layers


def shrink(run, layers: list[int], int8: bool = False, data=None, output=None, calls: int = 50) -> dict:
    """Students distilled from `run` at each depth, exported, and every model scored and timed; returns (and writes
    to OUTPUT/shrink.json) the report."""
    from finetune.backbones import check_backbone_layers
    from finetune.loading import resolve
    from finetune.tasks import get_task

    model_dir, run_dir = resolve(run)
    if run_dir is None:
        raise FinetuneError(f"{run}: not a run folder (config.yaml + model/); shrink needs the run that trained it")
    run_dir = run_dir.resolve()
    out = Path(output) if output else run_dir.parent / f"{run_dir.name}-shrink"
    if out.resolve() == run_dir or run_dir in out.resolve().parents:
        raise FinetuneError(f"--output: '{out}' is inside the run folder, which shrink never writes; give another")
    students = {n: _student_recipe(run_dir, n, data, out) for n in layers}
    teacher_recipe = _teacher_recipe(run_dir)
    task = get_task(teacher_recipe.task)
    for recipe in students.values():  # a backbone that cannot be trimmed, or too few layers: before any training
        check_backbone_layers(recipe, task.library)
    if data is not None:
        _check_unlabeled(data, students[layers[0]])
    runs = {n: train_student(recipe) for n, recipe in students.items()}
    report = measure_all(run_dir, [(f"{n} layers", n, run, exports_of(run, int8)) for n, run in runs.items()], calls)
    out.mkdir(parents=True, exist_ok=True)
    report["plot"] = str(write_plot(report, out / "shrink.png"))
    (out / "shrink.json").write_text(json.dumps(report, indent=1))
    return report


def _check_unlabeled(data, recipe) -> None:
    """--data exists and reads as the task's inputs (a missing path would be read as one text of its name)."""
    from finetune.distill import read_unlabeled

    if not Path(data).exists():
        raise FinetuneError(f"--data: '{data}' does not exist; give a .txt file (a text per line), a table with the "
                            "input column, or a folder of images")
    read_unlabeled(recipe)


def _teacher_recipe(run_dir: Path):
    from finetune.predictor import read_run_recipe

    return read_run_recipe(run_dir)


def _student_recipe(run_dir: Path, layers: int, data, out: Path):
    """The run's own recipe with backbone.layers=N and the run as the teacher, writing under `out`."""
    from finetune.api import resolve_recipe

    overrides = {"backbone.layers": layers, "distill.teacher": str(run_dir),
                 "distill.unlabeled": None if data is None else str(Path(data).resolve()),
                 "hub.repo_id": None}  # the teacher's hub repo is the teacher's: a student is not pushed over it
    return resolve_recipe(str(run_dir), overrides, output_dir=out / f"{run_dir.name}-{layers}layers")


def train_student(recipe) -> Path:
    from finetune.train import train

    train(recipe, overwrite=True)
    return Path(recipe.output.dir)


def exports_of(run: Path, int8: bool) -> dict[str, Path]:
    from finetune.api import export

    return {kind: export(run, quantize=None if kind == "fp32" else kind) for kind in (["fp32", "int8"] if int8
                                                                                      else ["fp32"])}


# ---------------------------------------------------------------------------------------------------------------
# measuring


def scoring_split(recipe):
    """(data spec, split name, raw split) the models are scored and timed on: the test split, else validation."""
    from finetune.evaluation import read_labelled

    d = recipe.data
    for spec, split in ((d.test, "test"), (d.train, "test"), (d.validation, "validation"), (d.train, "validation")):
        if spec is None:
            continue
        try:
            return str(spec), split, read_labelled(recipe, str(spec), split)
        except FinetuneError:
            continue
    raise FinetuneError(f"data.test: the run '{d.train}' has no test or validation split to score the models on; "
                        "set data.test in the run's config.yaml")


def measure_all(run_dir: Path, students: list[tuple], calls: int) -> dict:
    """Every model scored (its metric on the test split) and timed on the same inputs: the teacher and each student
    (name, layers or None, run folder, {"fp32": export folder, ...}) through their native library, each export
    through onnxruntime as finetune.load runs it."""
    import finetune
    from finetune.tasks import get_task

    recipe = _teacher_recipe(run_dir)
    task = get_task(recipe.task)
    spec, split, raw = scoring_split(recipe)
    inputs = task.timing_inputs(raw)
    metric = recipe.eval.select_best if recipe.eval.select_best != "loss" else (recipe.eval.metrics or ["loss"])[0]
    models = [("teacher", run_dir, run_dir / "model", None)]
    for name, layers, run, exports in students:
        models.append((name, run, run / "model", layers))
        models += [(f"{name} onnx {kind}", path, path, layers) for kind, path in exports.items()]
    runners, rows = {}, []
    for name, source, folder, layers in models:
        native = not (folder / "model.onnx").is_file()
        runners[name] = _native(task, folder, recipe) if native else _onnx(finetune.load(folder))
        score = finetune.evaluate(source, spec, split=split)
        rows.append({"model": name, "layers": layers, "runtime": task.library if native else "onnxruntime",
                     "metric": float(score[metric]), "bytes": folder_bytes(folder), "path": str(folder)})
    for row, timing in zip(rows, time_runners(runners, inputs, calls).values()):
        row.update(timing)
    return {"teacher": str(run_dir), "metric_name": metric, "data": spec, "split": split, "rows_timed": len(inputs),
            "calls": calls, "warmup": WARMUP, "rounds": ROUNDS, "threads": _threads(), "cpu_flags": avx512_flags(),
            "models": rows}


def _native(task, folder: Path, recipe):
    return task.native_runner(folder, recipe.data.max_length)


def _onnx(predictor):
    return lambda batch, size: predictor.predict(batch, batch_size=size)


def time_runners(runners: dict, inputs: list, calls: int) -> dict[str, dict]:
    """Per runner, batch-1 p50/p99 over `calls` timed calls (cycling through the inputs) and batch-32 inputs/s over
    the inputs (the best round), after WARMUP untimed calls of each size. The runners take turns within each of
    ROUNDS rounds, so a change in the machine's load falls on every model alike."""
    import numpy as np

    for run in runners.values():
        for _ in range(WARMUP):
            run(inputs[:32], 32)
            run(inputs[:1], 1)
    latency = {name: [] for name in runners}
    speeds = {name: [] for name in runners}
    per_round = -(-calls // ROUNDS)
    for turn in range(ROUNDS):
        for name, run in runners.items():
            for i in range(turn * per_round, min(calls, (turn + 1) * per_round)):
                start = time.perf_counter()
                run([inputs[i % len(inputs)]], 1)
                latency[name].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            for i in range(0, len(inputs), 32):
                run(inputs[i:i + 32], 32)
            speeds[name].append(len(inputs) / (time.perf_counter() - start))
    return {name: {"p50_ms": float(np.percentile(latency[name], 50)), "p99_ms": float(np.percentile(latency[name], 99)),
                   "per_s_batch32": max(speeds[name])} for name in runners}


def folder_bytes(folder: Path) -> int:
    """The weights on disk (safetensors, ONNX graphs and their data, .bin), what a deployer ships beside the text."""
    suffixes = (".safetensors", ".onnx", ".bin", ".data", ".pth")
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.suffix in suffixes)


def _threads() -> dict:
    import torch

    from finetune.onnx_runtime import session_threads

    # torch as finetune predict leaves it (its default), onnxruntime as the kit's sessions set it
    return {"torch": torch.get_num_threads(), "onnxruntime": session_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def avx512_flags() -> list[str]:
    """The CPU's AVX-512 flags, as `lscpu | grep -o 'avx512[a-z_0-9]*' | sort -u` lists them (int8 speed needs VNNI)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"avx512[a-z_0-9]*", text)))


# ---------------------------------------------------------------------------------------------------------------
# what the deployer reads


def table(report: dict) -> str:
    """The report as aligned text, the teacher first, then a note on the machine."""
    head = ["model", report["metric_name"], "p50 ms", "p99 ms", "batch-32/s", "size MB", "vs teacher"]
    base = report["models"][0]["per_s_batch32"]
    lines = [[r["model"], f"{r['metric']:.4f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
              f"{r['per_s_batch32']:.1f}", f"{r['bytes'] / 1e6:.2f}", f"{r['per_s_batch32'] / base:.2f}x"]
             for r in report["models"]]
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in [head, *lines]]
    t = report["threads"]
    text.append(f"{report['split']} split of {report['data']}: {report['rows_timed']} inputs; {report['calls']} "
                f"timed batch-1 calls after {report['warmup']} warm-up calls, {report['rounds']} rounds taking turns; "
                f"torch {t['torch']} threads, "
                f"onnxruntime {t['onnxruntime']}")
    text.append(f"CPU flags: {' '.join(report['cpu_flags']) or 'no avx512'}")
    return "\n".join(text)


def write_plot(report: dict, path: Path) -> Path:
    """The test metric against batch-1 p50 latency, a labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for row in report["models"]:
        axes.scatter(row["p50_ms"], row["metric"], marker="*" if row["model"] == "teacher" else "o")
        axes.annotate(row["model"], (row["p50_ms"], row["metric"]), fontsize=7, xytext=(4, 3),
                      textcoords="offset points")
    axes.set_xlabel("batch-1 latency, p50 (ms)")
    axes.set_ylabel(f"test {report['metric_name']}")
    axes.set_title("finetune shrink: teacher and students")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
