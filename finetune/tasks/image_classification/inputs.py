"""Image inputs for predict and serve: image files, folders of images and table columns of paths or bytes,
serve's base64 strings, and the model's logits on them."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import numpy as np

from finetune.data import FILE_BUILDERS, IMAGE_EXTENSIONS, table_column
from finetune.errors import FinetuneError
from finetune.tasks.image_classification.files import load_image, resolve_path, unreadable


def read_image_inputs(items: list[str], column: str) -> list[tuple[str, object]]:
    """An image file, a folder of images (recursive, sorted), or a table whose `column` holds image paths
    (relative to the table) or bytes."""
    expanded: list[tuple[str, object]] = []
    for item in items:
        path = Path(item).expanduser()
        is_file = path.is_file()
        suffix = path.suffix.lower() if is_file else ""
        if path.is_dir():
            files = _image_files(path)
            if not files:
                raise FinetuneError(f"{item}: no image files in this folder "
                                    f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
            expanded += [(str(f), str(f)) for f in files]
        elif is_file and suffix in IMAGE_EXTENSIONS:
            expanded.append((item, str(path)))
        elif is_file and suffix in FILE_BUILDERS:
            for i, value in enumerate(table_column(path, column, "--column")):
                entry = resolve_path(value, path.parent)
                expanded.append((entry if isinstance(entry, str) else f"{path} row {i + 1}", entry))
        elif not path.exists():
            raise FinetuneError(f"{item}: no such image file or folder")
        else:
            raise FinetuneError(
                f"{item}: not an image ({', '.join(sorted(IMAGE_EXTENSIONS))}), a folder of images, or a "
                f"{'/'.join(ext.lstrip('.') for ext in FILE_BUILDERS)} file with an image column (--column)"
            )
    return expanded


def _image_files(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(path)
    return found


def parse_image_input(value, i: int):
    """One /predict input: an image as a base64 string (a data: URL too)."""
    if not isinstance(value, str):
        raise FinetuneError(f"inputs[{i}]: an image model takes base64 strings, got {type(value).__name__}")
    try:
        data = base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError):
        raise FinetuneError(f"inputs[{i}]: not valid base64") from None
    if unreadable(data) is not None:
        raise FinetuneError(f"inputs[{i}]: not a readable image")
    return f"input {i + 1}", data


def image_logits(predictor, entries: list, batch_size: int, show: bool) -> np.ndarray:
    """Logits of images (paths, bytes, arrays or PIL images), checked readable first, in batches."""
    import torch
    from tqdm.auto import tqdm

    for i, entry in enumerate(entries):
        if type(entry).__module__.startswith("PIL."):
            continue
        if isinstance(entry, Path):
            entry = str(entry)
        reason = unreadable(entry)
        if reason is not None:
            where = f"'{entry}'" if isinstance(entry, str) else f"input {i + 1}"
            raise FinetuneError(f"image {where}: {reason}")
    rows = []
    for start in tqdm(range(0, len(entries), batch_size), desc="predict", unit="batch", disable=not show):
        chunk = entries[start:start + batch_size]
        pixels = torch.stack([predictor.preprocess(load_image(str(e) if isinstance(e, Path) else e)) for e in chunk])
        rows.append(predictor.forward({"pixel_values": pixels}))
    return np.concatenate(rows)
