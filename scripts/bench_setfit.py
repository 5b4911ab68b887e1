"""Few labels: the kit's shipped recipe (text/minilm-few-labels) against SetFit's defaults (batch 16, 20 iterations,
1 epoch, a logistic-regression head) on the same rows, seeds and MiniLM folder.

    pip install setfit
    python scripts/bench_setfit.py --out docs/bench/setfit.json [--data bbc-news] [--per-class 8,16,32,64]
        [--seeds 5] [--max-length 64] [--train FILE --test FILE]   # files: columns text, label

For each size and seed, N rows per class are drawn (shuffled with the seed, the first N of each class: SetFit's
sample_dataset) into a CSV that is all the labels either side sees: the kit runs `finetune run` on it with no
validation file, SetFit trains on it. Each side runs in its own process (SetFit's imports nothing from finetune);
seconds are whole-process wall time. Accuracy is on the whole test split. Report the CPU flags beside the numbers
(printed first): figures from different CPUs differ.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETFIT_WORKER = r'''
import csv, json, sys, time
start = time.perf_counter()
from datasets import Dataset
from setfit import SetFitModel, Trainer, TrainingArguments

model_dir, train_csv, test_csv, seed, max_length, out = sys.argv[1:7]
def read(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return Dataset.from_dict({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]})
train, test = read(train_csv), read(test_csv)
model = SetFitModel.from_pretrained(model_dir)
model.model_body.max_seq_length = int(max_length)
# SetFit's defaults; its default also writes a checkpoint into the working directory, which a benchmark does not want
args = TrainingArguments(batch_size=16, num_iterations=20, num_epochs=1, seed=int(seed),
                         output_dir=out + ".checkpoints", save_strategy="no", report_to="none")
Trainer(model=model, args=args, train_dataset=train).train()
predicted = model.predict(test["text"], as_numpy=True)
accuracy = sum(str(p) == t for p, t in zip(predicted, test["label"])) / len(test)
json.dump({"accuracy": accuracy, "seconds": time.perf_counter() - start}, open(out, "w"))
'''


def cpu_flags() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return " ".join(sorted({word for word in text.split() if word.startswith("avx512") or word.startswith("amx")}))


def read_rows(args) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) as (text, label) rows: a file pair, or a zoo set through the kit's reader."""
    if args.train:
        def read(path):
            with open(path, newline="") as f:
                return [(r["text"], r["label"]) for r in csv.DictReader(f)]
        return read(args.train), read(args.test)
    from finetune.tasks.text_classification.reading import TEXT_ZOO

    parts = TEXT_ZOO[args.data]()
    return ([(t, str(y)) for t, y in zip(parts["train"].texts, parts["train"].labels)],
            [(t, str(y)) for t, y in zip(parts["test"].texts, parts["test"].labels)])


def per_class(rows: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    taken: dict[str, int] = {}
    kept = []
    for text, label in shuffled:
        if taken.get(label, 0) < n:
            taken[label] = taken.get(label, 0) + 1
            kept.append((text, label))
    return kept


def write(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def timed(command: list[str], out: Path) -> dict:
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"bench_setfit: {' '.join(command[:4])}... failed:\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    return json.loads(out.read_text()) | {"seconds": seconds}


def kit(folder: Path, train: Path, test: Path, seed: int, max_length: int) -> dict:
    run = folder / f"kit-{seed}"
    command = [sys.executable, "-m", "finetune", "run", "text/minilm-few-labels", f"data.train={train}",
               f"data.test={test}", f"train.seed={seed}", f"data.max_length={max_length}", f"output.dir={run}",
               "data.text_column=text", "data.label_column=label", "--overwrite"]
    metrics = timed(command, run / "metrics.json")
    return {"accuracy": metrics["test"]["accuracy"], "seconds": metrics["seconds"]}


def setfit(folder: Path, model_dir: str, train: Path, test: Path, seed: int, max_length: int) -> dict:
    worker, out = folder / "setfit_worker.py", folder / f"setfit-{seed}.json"
    worker.write_text(SETFIT_WORKER)
    return timed([sys.executable, str(worker), model_dir, str(train), str(test), str(seed), str(max_length),
                  str(out)], out)


def spread(points: list[dict], key: str) -> dict:
    values = [p[key] for p in points]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="bbc-news", help="a zoo text set (default: %(default)s)")
    parser.add_argument("--train", help="a CSV with text,label columns (instead of --data)")
    parser.add_argument("--test", help="its test CSV")
    parser.add_argument("--per-class", default="8,16,32,64")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    from finetune.backbones import TEXT_ZOO as BACKBONES

    flags = cpu_flags()
    print(f"cpu flags: {flags}", flush=True)
    train_rows, test_rows = read_rows(args)
    model_dir = BACKBONES["minilm-l6"]()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        test = write(folder / "test.csv", test_rows)
        for n in [int(item) for item in args.per_class.split(",")]:
            for seed in range(args.seeds):
                train = write(folder / f"train-{n}-{seed}.csv", per_class(train_rows, n, seed))
                point = {"per_class": n, "seed": seed,
                         "kit": kit(folder, train, test, seed, args.max_length),
                         "setfit": setfit(folder, model_dir, train, test, seed, args.max_length)}
                print(json.dumps(point), flush=True)
                results.append(point)
    sizes = sorted({p["per_class"] for p in results})
    summary = {str(n): {side: {key: spread([p[side] for p in results if p["per_class"] == n], key)
                               for key in ("accuracy", "seconds")} for side in ("kit", "setfit")} for n in sizes}
    for n, sides in summary.items():
        print(f"n={n}: " + " | ".join(f"{side} accuracy {s['accuracy']['mean']:.4f} +- {s['accuracy']['std']:.4f}, "
                                      f"{s['seconds']['mean']:.0f} s" for side, s in sides.items()))
    if args.out:
        args.out.write_text(json.dumps({"cpu_flags": flags, "data": args.train or args.data,
                                        "max_length": args.max_length, "points": results, "summary": summary},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
