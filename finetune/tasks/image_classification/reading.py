"""Reading image splits: the digits/fashion-mnist zoo, class folders, split folders, tables of paths or bytes and hub
sets, checked and split. Entries stay undecoded (paths or bytes); `files.load_image` decodes one.

A split is a `finetune.data.RawSplit` whose `texts` field holds image entries.
"""

from __future__ import annotations

import gzip
import math
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from finetune.data import (
    FILE_BUILDERS,
    IMAGE_EXTENSIONS,
    RawSplit,
    Splits,
    assemble_splits,
    label_values,
    load_table,
    not_found,
    open_dataset,
    require_columns,
    stratified_split,
    subset_rows,
    where_row,
)
from finetune.errors import FinetuneError
from finetune.problems import get
from finetune.needs import APT_DATA
from finetune.tasks.image_classification.files import resolve_path, unreadable

SPLIT_FOLDERS = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                 "dev": "validation", "test": "test"}
FASHION_MNIST_DIR = APT_DATA["fashion-mnist"][1]  # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]  # the data set's own names, in the order of its label numbers


def _fixed_split(name: str, images: list, labels: list[str], rows: list) -> dict[str, RawSplit]:
    """80/10/10 stratified with seed 0 (as bbc-news), so every run tests on the same images."""
    rest, test = stratified_split(labels, 0.1, seed=0)
    train, validation = stratified_split([labels[i] for i in rest], 1 / 9, seed=0)
    parts = {"train": [rest[i] for i in train], "validation": [rest[i] for i in validation], "test": test}
    return {
        split: RawSplit([images[i] for i in idx], [labels[i] for i in idx], [rows[i] for i in idx], f"{name}:{split}")
        for split, idx in parts.items()
    }


def _digits() -> dict[str, RawSplit]:
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1,797 8x8 images with 17 grey levels (0..16), none an exact duplicate of another
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = [str(int(target)) for target in digits.target]
    return _fixed_split("digits", list(images), labels, list(range(len(labels))))


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX array of unsigned bytes (the MNIST file format), gzip-compressed."""
    try:
        with gzip.open(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError) as error:
        raise FinetuneError(f"fashion-mnist: cannot read {path} ({error}); reinstall dataset-fashion-mnist") from None
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    if len(raw) < header or int.from_bytes(raw[:4], "big") != 0x800 + dims or len(raw) - header != math.prod(shape):
        raise FinetuneError(f"fashion-mnist: {path} is not an IDX file of {dims}-d bytes; reinstall it")
    array = np.frombuffer(raw, np.uint8, offset=header).reshape(shape)
    return array


@lru_cache(maxsize=1)
def _fashion_mnist_arrays(root: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    arrays = {}
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        for name in (images_file, labels_file):
            if not (Path(root) / name).is_file():
                raise FinetuneError(
                    f"fashion-mnist: {Path(root) / name} not found; the data set comes from a Debian/Ubuntu package: "
                    "`apt-get install dataset-fashion-mnist`"
                )
        images, labels = _read_idx(Path(root) / images_file, 3), _read_idx(Path(root) / labels_file, 1)
        if len(images) != len(labels) or labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise FinetuneError(f"fashion-mnist: {root}: images and labels of '{split}' do not match; reinstall it")
        arrays[split] = (images, labels)
    return arrays


def _fashion_mnist() -> dict[str, RawSplit]:
    """Its own 60k train / 10k test; 5,000 of train (stratified, seed 0) held out as the fixed validation split."""
    arrays = _fashion_mnist_arrays(str(FASHION_MNIST_DIR))
    images, numbers = arrays["train"]
    labels = [FASHION_MNIST_CLASSES[n] for n in numbers]
    train, validation = stratified_split(labels, 1 / 12, seed=0)
    splits = {
        split: RawSplit([images[i] for i in idx], [labels[i] for i in idx], idx, f"fashion-mnist:{split}")
        for split, idx in (("train", train), ("validation", validation))
    }
    test_images, test_numbers = arrays["test"]
    splits["test"] = RawSplit(
        list(test_images), [FASHION_MNIST_CLASSES[n] for n in test_numbers], list(range(len(test_numbers))),
        "fashion-mnist:test",
    )
    return splits


IMAGE_ZOO = {"digits": _digits, "fashion-mnist": _fashion_mnist}


def read_image_split(spec: str, recipe, key: str) -> dict[str, RawSplit]:
    """The split(s) named by a data.train/validation/test value, keyed by split name ("file" for a single split)."""
    if spec in IMAGE_ZOO:
        return IMAGE_ZOO[spec]()
    if spec.startswith("hub:"):
        return _read_image_hub(spec, recipe, key)
    path = Path(spec).expanduser()
    if not path.exists():
        raise not_found(
            key, spec, IMAGE_ZOO,
            "image data is a folder with one subfolder per class, a csv/tsv/json/jsonl/parquet file with an image "
            "column",
        )
    if path.is_dir():
        return _read_folder(path, spec, recipe, key)
    return {"file": _read_table_file(path, spec, recipe, key)}


def _visible_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_folder(root: Path, spec: str, recipe, key: str) -> dict[str, RawSplit]:
    if not get(recipe.head.problem).has_labels:
        raise FinetuneError(
            f"{key}: '{spec}' is an image folder, whose subfolders are classes; head.problem=regression needs a "
            f"csv/jsonl/parquet file with a number in column '{recipe.data.label_column}'"
        )
    folders = _visible_folders(root)
    if folders and {f.name.lower() for f in folders} <= set(SPLIT_FOLDERS):  # root/train/<class>/..., root/test/...
        base = spec.rstrip("/")
        return {SPLIT_FOLDERS[f.name.lower()]: _read_class_folders(f, f"{base}/{f.name}", key) for f in folders}
    return {"file": _read_class_folders(root, spec, key)}


def _read_class_folders(root: Path, source: str, key: str) -> RawSplit:
    """One image per file under root/<class>/ (nested folders too); other files and hidden ones are ignored."""
    images, labels, rows = [], [], []
    for folder in _visible_folders(root):
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(root)
            if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if path.is_file():
                images.append(str(path))
                labels.append(folder.name)
                rows.append(relative.as_posix())
    if not images:
        raise FinetuneError(
            f"{key}: '{source}' has no images in class subfolders; an image folder holds one subfolder per class, "
            f"e.g. {source.rstrip('/')}/cat/001.jpg (image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return RawSplit(images, labels, rows, source)


def _read_table_file(path: Path, spec: str, recipe, key: str) -> RawSplit:
    suffix = path.suffix.lower()
    if suffix not in FILE_BUILDERS:
        what = "is one image" if suffix in IMAGE_EXTENSIONS else "has an unknown extension"
        raise FinetuneError(
            f"{key}: '{spec}' {what}; image data is a folder with one subfolder per class or a "
            f"{'/'.join(ext.lstrip('.') for ext in FILE_BUILDERS)} file with column '{recipe.data.image_column}'"
        )
    table = load_table(path, f"{key}: '{spec}'")
    line_based = suffix in (".csv", ".tsv", ".jsonl")
    split = _image_columns(table, recipe, f"{key}: '{spec}'", "line" if line_based else "row", base=path.parent)
    split.path = path if line_based else None
    return split


def _read_image_hub(spec: str, recipe, key: str) -> dict[str, RawSplit]:
    tables = open_dataset(spec[len("hub:"):], what=f"{key}: '{spec}'")
    return {
        SPLIT_FOLDERS.get(name, name): _image_columns(table, recipe, f"{key}: '{spec}' split '{name}'", "row", None)
        for name, table in tables.items()
    }


def _image_columns(table, recipe, what: str, row_name: str, base: Path | None) -> RawSplit:
    from datasets import Image

    d = recipe.data
    require_columns(table, what, {"data.image_column": d.image_column, "data.label_column": d.label_column})
    column = d.image_column
    if isinstance(table.features[column], Image):
        table = table.cast_column(column, Image(decode=False))  # {"bytes", "path"}: decoded later, one at a time
    return RawSplit(
        texts=[resolve_path(value, base) for value in table[column]],
        labels=list(label_values(table, d.label_column, recipe.head.problem)),
        rows=list(range(len(table))),
        source=what.split(": ", 1)[-1],
        row_name=row_name,
        row_offset=1,
    )


def _name_image(split: RawSplit, position: int, column: str) -> str:
    entry = split.texts[position]
    path = entry if isinstance(entry, str) else None
    if isinstance(split.rows[position], int):  # a row of a table or a zoo set: name the row, and the file if any
        return f"{where_row(split, position)}: image " + (f"'{path}'" if path else f"in column '{column}'")
    return f"image '{path}'" if path else f"{split.source} ({split.rows[position]})"


def check_images(split: RawSplit, key: str, skip: bool, column: str) -> tuple[RawSplit, list[str]]:
    """Decode-check every image up front, so no bad file surfaces later inside a DataLoader worker."""
    kept, skipped = [], []
    for i, entry in enumerate(split.texts):
        reason = unreadable(entry)
        if reason is None:
            kept.append(i)
        elif skip:
            skipped.append(f"{_name_image(split, i, column)}: {reason}")
        else:
            raise FinetuneError(
                f"{_name_image(split, i, column)}: {reason}; fix or remove it, or set data.skip_bad_images=true to "
                "skip unreadable images"
            )
    if not kept:
        raise FinetuneError(f"{key}: none of the {len(split.texts)} images of {split.source} can be read")
    return (split if not skipped else subset_rows(split, kept)), skipped


def load_image_splits(recipe) -> Splits:
    """Read, check, split and encode the recipe's image data; tables are {"image", "label", "row"} lists.

    The split rules are data.assemble_splits'. Images are decode-checked after the max_samples cap (only what will
    be used is read); with data.skip_bad_images the unreadable ones are dropped, counted in a warning and listed in
    split.json (the label space and the held-out split are decided before, so they do not depend on broken files).
    """
    d = recipe.data
    skipped_total = []

    def check(split: RawSplit, key: str) -> tuple[RawSplit, list[str]]:
        split, skipped = check_images(split, key, d.skip_bad_images, d.image_column)
        skipped_total.extend(skipped)
        return split, skipped

    splits = assemble_splits(recipe, read_image_split, "image", check)
    if skipped_total:
        warnings.warn(f"skipped {len(skipped_total)} unreadable image(s) (data.skip_bad_images); split.json lists them")
    return splits
