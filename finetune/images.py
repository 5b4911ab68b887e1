"""Images: reading image splits, the digits/fashion-mnist zoo, timm transforms, image loaders and mixup."""

from __future__ import annotations

import gzip
import io
import math
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from finetune.data import (
    FILE_BUILDERS,
    RawSplit,
    Splits,
    _label_values,
    _load_dataset,
    _subset,
    _where,
    assemble_splits,
    load_table,
    not_found,
    require_columns,
    stratified_split,
)
from finetune.errors import FinetuneError
from finetune.problems import get
from finetune.needs import APT_DATA

# RawSplit comes from the text pipeline: here its `texts` field holds image entries (see `load_image`).

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
}
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                 "dev": "validation", "test": "test"}
# timm has no TrivialAugment policy name; this RandAugment string is its equivalent: one op per image (n1), always
# applied (p1), magnitude drawn uniformly from [0, 10] (mstd > 100 means uniform), strength rising with magnitude (inc1)
TRIVIAL_AUGMENT = "rand-n1-m10-mstd101-inc1-p1"
AUTO_AUGMENT_ALIASES = {"trivialaugment": TRIVIAL_AUGMENT, "trivial": TRIVIAL_AUGMENT}

FASHION_MNIST_DIR = APT_DATA["fashion-mnist"][1]  # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]  # the data set's own names, in the order of its label numbers


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


# ---------------------------------------------------------------------------------------------------------------
# Offline zoo data sets: each brings a fixed train/validation/test split, independent of train.seed.


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


# ---------------------------------------------------------------------------------------------------------------
# Reading folders, files and hub data sets. Entries stay undecoded (paths or bytes); `load_image` decodes one.


def read_image_split(spec: str, recipe, key: str) -> dict[str, RawSplit]:
    """The split(s) named by a data.train/validation/test value, keyed by split name ("file" for a single split)."""
    if spec in IMAGE_ZOO:
        return IMAGE_ZOO[spec]()
    if spec.startswith("hub:"):
        return _read_hub(spec, recipe, key)
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


def _read_hub(spec: str, recipe, key: str) -> dict[str, RawSplit]:
    tables = _load_dataset(spec[len("hub:"):], what=f"{key}: '{spec}'")
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
        texts=[_resolve_path(value, base) for value in table[column]],
        labels=list(_label_values(table, d.label_column, recipe.head.problem)),
        rows=list(range(len(table))),
        source=what.split(": ", 1)[-1],
        row_name=row_name,
        row_offset=1,
    )


def _resolve_path(value: Any, base: Path | None) -> Any:
    """A relative image path in a file is relative to that file's folder."""
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        value = value["path"]
    if isinstance(value, str) and value.strip() and base is not None:
        path = Path(value.strip()).expanduser()
        return str(path if path.is_absolute() else base / path)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Decoding and checking images.


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
    other formats are decoded whole. For training crops that are resized down anyway (finetune.images.draft_side).
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


def _unreadable(entry: Any) -> str | None:
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


def _name_image(split: RawSplit, position: int, column: str) -> str:
    entry = split.texts[position]
    path = entry if isinstance(entry, str) else None
    if isinstance(split.rows[position], int):  # a row of a table or a zoo set: name the row, and the file if any
        return f"{_where(split, position)}: image " + (f"'{path}'" if path else f"in column '{column}'")
    return f"image '{path}'" if path else f"{split.source} ({split.rows[position]})"


def _check_images(split: RawSplit, key: str, skip: bool, column: str) -> tuple[RawSplit, list[str]]:
    """Decode-check every image up front, so no bad file surfaces later inside a DataLoader worker."""
    kept, skipped = [], []
    for i, entry in enumerate(split.texts):
        reason = _unreadable(entry)
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
    return (split if not skipped else _subset(split, kept)), skipped


# ---------------------------------------------------------------------------------------------------------------
# Splits: the same semantics as data.load_splits, with images instead of texts.


def load_image_splits(recipe) -> Splits:
    """Read, check, split and encode the recipe's image data; tables are {"image", "label", "row"} lists.

    The split rules are data.assemble_splits'. Images are decode-checked after the max_samples cap (only what will
    be used is read); with data.skip_bad_images the unreadable ones are dropped, counted in a warning and listed in
    split.json (the label space and the held-out split are decided before, so they do not depend on broken files).
    """
    d = recipe.data
    skipped_total = []

    def check(split: RawSplit, key: str) -> tuple[RawSplit, list[str]]:
        split, skipped = _check_images(split, key, d.skip_bad_images, d.image_column)
        skipped_total.extend(skipped)
        return split, skipped

    splits = assemble_splits(recipe, read_image_split, "image", check)
    if skipped_total:
        warnings.warn(f"skipped {len(skipped_total)} unreadable image(s) (data.skip_bad_images); split.json lists them")
    return splits


# ---------------------------------------------------------------------------------------------------------------
# Transforms: timm's own, from the backbone's data config.


def auto_augment_policy(name: str | None) -> str | None:
    """The timm policy string for augment.auto_augment (`trivialaugment` is spelled as timm's RandAugment)."""
    if name is None:
        return None
    return AUTO_AUGMENT_ALIASES.get(name.strip().lower(), name)


def draft_side(data_config: dict, recipe) -> int:
    """The shortest image side training needs so that its random-resized crops are resized down, never up: the
    smallest crop (augment.scale's lower bound, aspect up to 4/3 as timm draws it) still spans the input size."""
    _, height, width = data_config["input_size"]
    size = max(height, width) if recipe.data.image_size is None else recipe.data.image_size
    low = float(recipe.augment.scale[0])
    widest = 1.0 if list(recipe.augment.scale) == [1.0, 1.0] else 4 / 3  # build_transforms fixes the ratio then
    return math.ceil(size / math.sqrt(low / widest))


def build_transforms(data_config: dict, recipe, training: bool):
    """timm's transform for a PIL image: deterministic resize/center-crop/normalize, or the recipe's augmentation.

    data_config is what `timm.data.resolve_model_data_config(model)` returns (input_size, interpolation, mean, std,
    crop_pct, crop_mode); data.image_size replaces its input size. Training uses a random-resized crop over
    augment.scale, flips, the auto_augment policy and random erasing, and no color jitter (the recipe has no key
    for it); with all of these off the training transform is deterministic.
    """
    from timm.data import create_transform

    channels, height, width = data_config["input_size"]
    if recipe.data.image_size is not None:
        height = width = recipe.data.image_size
    common = dict(
        input_size=(channels, height, width),
        interpolation=data_config.get("interpolation", "bilinear"),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
    )
    if not training:
        return create_transform(
            **common, is_training=False, crop_pct=data_config.get("crop_pct"), crop_mode=data_config.get("crop_mode")
        )
    a = recipe.augment
    scale = (float(a.scale[0]), float(a.scale[1]))
    policy = auto_augment_policy(a.auto_augment)
    try:
        transform = create_transform(
            **common,
            is_training=True,
            scale=scale,
            # scale [1, 1] means "no crop augmentation"; without a fixed ratio the crop would still stretch randomly
            ratio=(1.0, 1.0) if scale == (1.0, 1.0) else None,
            hflip=a.hflip,
            color_jitter=None,
            auto_augment=policy,
            re_prob=a.random_erasing,
            re_mode="pixel",  # timm train.py's default: erase to per-pixel noise
        )
    except (AssertionError, KeyError, ValueError, IndexError) as error:
        if policy is None:
            raise
        raise FinetuneError(
            f"augment.auto_augment: '{a.auto_augment}' is not a timm policy ({error or 'unknown policy'}); use e.g. "
            "rand-m9-mstd0.5-inc1 (RandAugment), trivialaugment, augmix-m5-w3, original (AutoAugment), or null"
        ) from None
    return _posterize_keeps_one_bit(transform)


def _posterize(image, bits_to_keep: int, **kwargs):
    """timm's posterize op with at least one bit (a module-level function, so DataLoader workers can pickle it)."""
    from timm.data.auto_augment import posterize

    return posterize(image, max(1, bits_to_keep), **kwargs)


def _posterize_keeps_one_bit(transform):
    """timm maps posterize's extreme magnitudes to 0 bits, which Pillow >= 12 refuses with a ValueError: one image in
    a few hundred would crash a RandAugment run mid-epoch. Keeping 1 bit is the same (near-black-and-white) image."""
    for step in getattr(transform, "transforms", [transform]):
        ops = list(getattr(step, "ops", []))  # RandAugment, AugMix
        for sub_policy in getattr(step, "policy", []):  # AutoAugment
            ops.extend(sub_policy)
        for op in ops:
            if str(getattr(op, "name", "")).startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


# ---------------------------------------------------------------------------------------------------------------
# Datasets and loaders.


def _describe_entry(entry: Any, row: Any) -> str:
    if isinstance(entry, dict):
        entry = entry.get("path") or entry
    return f"image '{entry}'" if isinstance(entry, (str, os.PathLike)) else f"image of row {row}"


class DecodedImages:
    """Decoded images kept in memory across epochs, up to a byte budget shared by the datasets that hold it: an
    image file is then decoded once a run, not once an epoch (the random crops, flips and erasing are drawn anew
    from the decoded pixels each time, so training sees what it would see without it). Only for datasets read in
    the training process: a loader's worker processes hold copies of the dataset that end with each epoch."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self.images: dict = {}  # (dataset id, index) -> PIL image

    def get(self, key):
        return self.images.get(key)

    def keep(self, key, image) -> None:
        size = image.width * image.height * len(image.getbands())
        if self.used + size <= self.budget:
            self.images[key] = image
            self.used += size


def decoded_cache_budget() -> int:
    """Bytes of decoded images worth keeping: an eighth of the machine's memory, at most 2 GiB."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 * 2**30
    return min(2 * 2**30, memory // 8)


class ImageDataset(Dataset):
    """A table's images, decoded and transformed one at a time: {"pixel_values": C×H×W float tensor, "labels": ...}.

    A table without a "label" list (prediction) gives items without "labels". decoded: a DecodedImages that keeps
    the decoded pixels across epochs (the transform still runs on every item).
    """

    def __init__(self, table: dict, transform, min_side: int | None = None, decoded: DecodedImages | None = None):
        self.images = table["image"]
        self.labels = table.get("label")
        self.rows = table.get("row") or list(range(len(self.images)))
        self.transform = transform
        self.min_side = min_side  # load_image's: JPEGs decoded at a reduced scale that keeps this many pixels
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        key = (id(self), index)
        image = self.decoded.get(key) if self.decoded is not None else None
        if image is None:
            image = self._load(index)
            if self.decoded is not None and not isinstance(self.images[index], np.ndarray):  # arrays are decoded
                self.decoded.keep(key, image)
        item = {"pixel_values": self.transform(image)}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item

    def _load(self, index: int):
        try:
            return load_image(self.images[index], self.min_side)
        except Exception as error:  # checked when the splits were built, so the file changed since then
            raise BadImageError(
                f"{_describe_entry(self.images[index], self.rows[index])} cannot be read any more "
                f"({type(error).__name__}: {error}); it was readable when the splits were built"
            ) from None


def collate_images(batch: list[dict]) -> dict:
    """{"pixel_values": B×C×H×W, "labels": long for class indices, float for multi-hot rows and regression}."""
    import torch

    collated = {"pixel_values": torch.stack([item["pixel_values"] for item in batch])}
    if "labels" in batch[0]:
        labels = [item["labels"] for item in batch]
        is_index = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels)
        collated["labels"] = torch.tensor(labels, dtype=torch.long if is_index else torch.float32)
    return collated


def make_image_loader(dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int | None,
                      drop_last: bool = False, sampler=None):
    """A DataLoader over an ImageDataset; num_workers None: min(4, CPUs).

    The order comes from a generator of its own, so it does not depend on the number of workers (a loader with
    workers also draws their base seed from its generator, once per epoch, and persistent workers only once a run).
    Workers are started each epoch, so their `random`/torch streams (augmentation) are a function of the seed and
    the epoch, as on resume; with num_workers=0 augmentation draws from the global RNGs (seeded by
    accelerate.set_seed). drop_last: set it for training with mixup/cutmix, which need an even batch.
    """
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    if shuffle and sampler is None:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),  # the workers' base seed
        collate_fn=collate_images,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )


# ---------------------------------------------------------------------------------------------------------------
# Mixup / CutMix.


def build_mixup(recipe, num_classes: int):
    """timm's Mixup for augment.mixup/cutmix (None when both are 0), with train.label_smoothing in its targets.

    `mixup(pixel_values, labels)` returns mixed images and soft targets (B×num_classes, rows summing to one): the
    trainer must then use soft-target cross-entropy (timm.loss.SoftTargetCrossEntropy) for training batches, keep
    plain cross-entropy on class indices for evaluation, and feed even batches (make_image_loader(drop_last=True)).
    """
    a = recipe.augment
    if a.mixup == 0 and a.cutmix == 0:
        return None
    if not get(recipe.head.problem).single_class:
        raise FinetuneError(
            f"augment.mixup/cutmix: they mix one-hot class targets, so they need head.problem=single_label "
            f"(not {recipe.head.problem}); set augment.mixup=0 and augment.cutmix=0"
        )
    if recipe.train.batch_size % 2:
        raise FinetuneError(
            f"train.batch_size: mixup/cutmix mix each batch with its reverse, so it must be even, got "
            f"{recipe.train.batch_size}"
        )
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix,
        label_smoothing=recipe.train.label_smoothing,
        num_classes=num_classes,
    )
