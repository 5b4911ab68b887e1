"""timm's transforms from the backbone's data config, the recipe's augmentation, and Mixup/CutMix."""

from __future__ import annotations

import math

from finetune.errors import FinetuneError
from finetune.problems import get

# timm has no TrivialAugment policy name; this RandAugment string is its equivalent: one op per image (n1), always
# applied (p1), magnitude drawn uniformly from [0, 10] (mstd > 100 means uniform), strength rising with magnitude (inc1)
TRIVIAL_AUGMENT = "rand-n1-m10-mstd101-inc1-p1"
AUTO_AUGMENT_ALIASES = {"trivialaugment": TRIVIAL_AUGMENT, "trivial": TRIVIAL_AUGMENT}


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


def teacher_pixels(pixels, student, teacher):
    """A batch normalised for the `student` timm model, as the `teacher` expects it: renormalised where their means
    or stds differ, resized where their input sizes do."""
    import torch
    import torch.nn.functional as F
    from timm.data import resolve_model_data_config

    mine, theirs = resolve_model_data_config(student), resolve_model_data_config(teacher)
    if (mine["mean"], mine["std"]) != (theirs["mean"], theirs["std"]):
        shape = (1, -1, 1, 1)
        mean, std = (torch.tensor(mine[k], device=pixels.device).view(shape) for k in ("mean", "std"))
        their_mean, their_std = (torch.tensor(theirs[k], device=pixels.device).view(shape) for k in ("mean", "std"))
        pixels = (pixels * std + mean - their_mean) / their_std
    if tuple(theirs["input_size"][1:]) != tuple(pixels.shape[-2:]):
        pixels = F.interpolate(pixels, size=tuple(theirs["input_size"][1:]), mode="bilinear", align_corners=False)
    return pixels
