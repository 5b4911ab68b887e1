#!/usr/bin/env python
"""Inference speed of a recipe's text model at fp32 and under bf16 autocast, measured interleaved.

    python scripts/profile_inference.py [RECIPE] [key=value ...] [--batches 12] [--batch-size 64] [--threads N]

The model is the kit's (finetune.tasks.text_classification.model.build_text_model, eval mode, torch.inference_mode), the
batches the recipe's own training rows tokenized at data.max_length and padded per batch. Each round runs one batch at
fp32 and the same batch under torch.autocast("cpu", bfloat16) (what finetune.predict does for a bf16 run on a CPU with
native bf16), alternating which goes first, so a neighbour's load hits both alike; medians are reported with the CPU's
flags.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="profile_inference.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("args", nargs="*", metavar="RECIPE key=value")
    parser.add_argument("--batches", type=int, default=12, help="measured rounds (default 12)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPUs)")
    args = parser.parse_args(argv)
    positional = list(args.args)
    recipe_arg = positional.pop(0) if positional and "=" not in positional[0] else "text/minilm-bbc-news"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from finetune.tasks.text_classification import tokens as data_module
    from finetune.tasks.text_classification.reading import load_text_splits as load_splits
    from finetune.tasks.text_classification.model import build_text_model
    from finetune.precision import autocast, cpu_flags
    from finetune.recipe import find_recipe, load_recipe

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    recipe = load_recipe(find_recipe(recipe_arg), positional)
    splits = load_splits(recipe)
    model, tokenizer = build_text_model(recipe, splits.label_names)
    model.eval()
    dataset = data_module.tokenize_texts(splits.train, tokenizer, recipe.data.max_length)
    loader = data_module.make_text_loader(dataset, tokenizer, args.batch_size, False, recipe.train.seed)
    batches = [{k: v for k, v in b.items() if k != "labels"} for _, b in zip(range(args.batches + 2), loader)]
    times = {"fp32": [], "bf16": []}
    agree = []
    with torch.inference_mode():
        for i, batch in enumerate(batches):
            order = ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")
            logits = {}
            for name in order:
                tic = time.perf_counter()
                with autocast("cpu", name):
                    output = model(**batch)
                logits[name] = (output.logits if hasattr(output, "logits") else output).float()
                if i >= 2:  # the first rounds warm the kernels up
                    times[name].append((time.perf_counter() - tic) / len(batch["input_ids"]))
            agree.append((logits["fp32"].argmax(-1) == logits["bf16"].argmax(-1)).float().mean().item())
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"{recipe_arg} {' '.join(positional)}: batch {args.batch_size}, max_length {recipe.data.max_length}, "
          f"{threads} threads, CPU {cpu_flags()}, load average {os.getloadavg()[0]:.1f}")
    print(f"fp32 {1 / fp32:.1f} samples/s | bf16 autocast {1 / bf16:.1f} samples/s | bf16/fp32 {fp32 / bf16:.2f}x "
          f"(medians of {len(times['fp32'])} interleaved batches) | argmax agreement {statistics.mean(agree):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
