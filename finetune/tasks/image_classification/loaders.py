"""Image datasets and loaders: entries decoded and transformed per row, the decoded-image cache kept across epochs."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from finetune.tasks.image_classification.files import BadImageError, load_image


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
