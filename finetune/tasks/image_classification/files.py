"""One image: its extensions, where a table's entry points, decoding it (paths, bytes, arrays), and why one is
unreadable."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from finetune.errors import FinetuneError


class BadImageError(FinetuneError):
    """An image that stopped decoding after the splits were checked (raised inside a DataLoader worker).

    A worker's exception reaches the main process as `type(error)(message + traceback)`; this class takes its own
    message back out, so the user sees one line naming the file instead of a worker traceback.
    """

    def __init__(self, message: str):
        prefix = f"{__name__}.{type(self).__name__}: "
        if message.startswith("Caught ") and prefix in message:
            message = message.rsplit(prefix, 1)[1].strip()
        super().__init__(message)


def resolve_path(value: Any, base: Path | None) -> Any:
    """A relative image path in a file is relative to that file's folder."""
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        value = value["path"]
    if isinstance(value, str) and value.strip() and base is not None:
        path = Path(value.strip()).expanduser()
        return str(path if path.is_absolute() else base / path)
    return value


def _open(entry: Any):
    from PIL import Image

    if isinstance(entry, dict):
        entry = entry.get("bytes") or entry.get("path")
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(entry))
    if isinstance(entry, (str, os.PathLike)):
        return Image.open(entry)
    if isinstance(entry, np.ndarray):
        return Image.fromarray(entry)
    if isinstance(entry, Image.Image):
        return entry
    if entry is None or (isinstance(entry, float) and math.isnan(entry)):
        raise ValueError("no image (the cell is empty)")
    raise ValueError(f"not an image path, image bytes or array (got {type(entry).__name__})")


def load_image(entry: Any, min_side: int | None = None):
    """An RGB PIL image from a path, bytes, a {"bytes", "path"} dict, a uint8 array or a PIL image.

    Grayscale and palette images are expanded to RGB and an alpha channel is dropped, as timm's and torchvision's own
    loaders do, so a model exported for timm sees the same pixels in anyone's pipeline.

    min_side: a JPEG is decoded at the smallest of libjpeg's scales (1/2, 1/4, 1/8) that keeps both sides at least
    this long (PIL's Image.draft: the scaling happens inside the inverse DCT, so most of the decoding is skipped);
    other formats are decoded whole. For training crops that are resized down anyway (transforms.draft_side).
    """
    image = _open(entry)
    if min_side is not None and image is not entry and image.format == "JPEG":
        image.draft("RGB", (min_side, min_side))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    rgb = image.convert("RGB")  # convert decodes, so the file is read here, once
    if image is not entry:
        image.close()
    return rgb


def unreadable(entry: Any) -> str | None:
    """None when the image decodes; otherwise why not. Decoded arrays and PIL images need no check."""
    if isinstance(entry, np.ndarray) or type(entry).__module__.startswith("PIL."):
        return None
    if isinstance(entry, dict):
        entry = entry.get("bytes") or entry.get("path")
    if isinstance(entry, str):
        if os.path.isdir(entry):
            return "is a directory, not an image file"
        if not os.path.isfile(entry):
            return "no such file"
        if os.path.getsize(entry) == 0:
            return "the file is empty (0 bytes)"
    if isinstance(entry, (bytes, bytearray)) and len(entry) == 0:
        return "the image bytes are empty"
    try:
        with _open(entry) as image:
            image.verify()  # structure and checksums, without decoding
        with _open(entry) as image:
            image.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale, which still reads (and checks) every byte
            image.load()  # catches truncated files that verify() lets through
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... for broken files
        message = str(error).strip().splitlines()
        return f"not a readable image ({type(error).__name__}: {message[0] if message else ''})"
    return None
