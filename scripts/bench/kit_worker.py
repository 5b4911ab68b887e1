"""The kit's side: `finetune run RECIPE key=value ...` in this process, its run folder read back as a result.

    python kit_worker.py RESULT.json THREADS OPTIONS_JSON RECIPE [key=value ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(result_path: str, threads: str, options: str, recipe_arg: str, *overrides: str) -> None:
    import torch

    from finetune.cli import main as finetune_main

    torch.set_num_threads(int(threads))
    out = Path(json.loads(options)["output_dir"])
    code = finetune_main(["run", recipe_arg, *overrides, f"output.dir={out}"])
    if code:
        raise SystemExit(code)
    metrics = json.loads((out / "metrics.json").read_text())
    split = json.loads((out / "split.json").read_text())
    test = metrics.get("test") or {}
    log = (out / "train.log").read_text() if (out / "train.log").is_file() else ""
    result = {
        "rows": {key: len(split["splits"][key]["rows"]) if key in split["splits"] else None
                 for key in ("train", "validation", "test")},
        "labels": split["labels"],
        "test": {k: test[k] for k in ("accuracy", "f1_macro") if k in test} or None,
        "train_samples_per_second": metrics["train"]["samples_per_second"],
        "train_seconds": metrics["train"]["seconds"],
        "start_up_seconds": metrics["train"].get("start_up_seconds"),  # process start to the training loop
        "train_samples": metrics["train"]["samples"],
        "epochs_run": len(metrics["epochs"]),
        "best_epoch": metrics["best"]["epoch"],
        "epochs": metrics["epochs"],
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "precision": metrics["train"].get("precision", "fp32"),
        "cached_features": "cached features" in log,
        "notes": [],
    }
    Path(result_path).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
