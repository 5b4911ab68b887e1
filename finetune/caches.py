"""The kit's disk caches: where the token cache and the frozen-backbone feature cache live, their sizes, clearing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CACHES = ("tokens", "features")


def token_cache_dir() -> Path:
    """Tokenised text splits, written by `datasets` (data.tokenize) under its own cache (HF_DATASETS_CACHE)."""
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE) / "finetune-tokens"


def feature_cache_dir() -> Path:
    """Frozen-backbone features (transfer.cached_features), under FINETUNE_CACHE (default ~/.cache/finetune)."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune")) / "features"


def cache_dir(name: str) -> Path:
    return {"tokens": token_cache_dir, "features": feature_cache_dir}[name]()


def usage(name: str) -> dict:
    """{"cache", "path", "files", "bytes"} of one cache (0 files when it was never written)."""
    folder = cache_dir(name)
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return {"cache": name, "path": str(folder), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def clear(name: str) -> dict:
    """Remove one cache's folder (it is made again when next needed); returns what it held."""
    held = usage(name)
    folder = Path(held["path"])
    if folder.is_dir():
        shutil.rmtree(folder)
    return held


def human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
