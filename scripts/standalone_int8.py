"""A new user's check of an int8 text export: onnxruntime and the exported tokenizer alone (finetune not importable),
accuracy on a labelled CSV, and throughput against transformers.pipeline on the same texts in the same run.

    python -I scripts/standalone_int8.py EXPORT_DIR MODEL_DIR test.csv [--text-column text --label-column label]

Run with `python -I` (isolated: no PYTHONPATH, no current folder on sys.path); the script also makes finetune
unimportable, in case the environment has it installed.
"""

import argparse
import csv
import json
import sys
import time

# finetune may be installed in this environment (pip install -e): make it unimportable, so that nothing below can
# lean on it, directly or through a library
sys.modules["finetune"] = None

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("export")
parser.add_argument("model", help="the run's model/ folder, for transformers.pipeline")
parser.add_argument("data")
parser.add_argument("--text-column", default="text")
parser.add_argument("--label-column", default="label")
args = parser.parse_args()

with open(args.data, newline="", encoding="utf-8") as handle:
    rows = list(csv.DictReader(handle))
texts, truth = [r[args.text_column] for r in rows], [r[args.label_column] for r in rows]

# what the export's card shows, nothing more
info = json.load(open(f"{args.export}/export.json"))
tokenizer = Tokenizer.from_file(f"{args.export}/tokenizer.json")
tokenizer.enable_padding()
tokenizer.enable_truncation(info["max_length"] or 512)
session = ort.InferenceSession(f"{args.export}/model.onnx", providers=["CPUExecutionProvider"])


def onnx_labels(batch):
    encoded = tokenizer.encode_batch(batch)
    feeds = {"input_ids": [e.ids for e in encoded], "attention_mask": [e.attention_mask for e in encoded],
             "token_type_ids": [e.type_ids for e in encoded]}
    logits = session.run(None, {k: np.array(feeds[k], dtype=np.int64) for k in info["inputs"]})[0]
    return [info["labels"][i] for i in logits.argmax(-1)]


from transformers import pipeline  # noqa: E402  (the baseline a user would otherwise pick)

pipe = pipeline("text-classification", model=args.model, device="cpu")


def pipe_labels(batch):
    return [r["label"] for r in pipe(batch, batch_size=len(batch), truncation=True, max_length=info["max_length"])]


result = {}
for name, run in (("onnx_int8_standalone", onnx_labels), ("pipeline", pipe_labels)) * 2:  # interleaved, twice
    run(texts[:32])
    start = time.perf_counter()
    predicted = [label for i in range(0, len(texts), 32) for label in run(texts[i:i + 32])]
    seconds = time.perf_counter() - start
    accuracy = float(np.mean([a == b for a, b in zip(predicted, truth)]))
    best = max(result.get(name, {}).get("texts_per_s", 0), len(texts) / seconds)
    result[name] = {"accuracy": accuracy, "texts_per_s": best}
result["ratio"] = result["onnx_int8_standalone"]["texts_per_s"] / result["pipeline"]["texts_per_s"]
result["threads"] = "onnxruntime default (all cores)"
print(json.dumps(result))
