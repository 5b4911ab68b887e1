"""What the card and an ONNX export take from timm: a backbone name's hub id, and an exported folder's preprocessing."""

from __future__ import annotations

import json
from pathlib import Path


def timm_base_model(name: str) -> str | None:
    """The hub id timm's pretrained config names for a backbone (None for a local folder or an unknown name)."""
    if name == "efficientnet-lite0":
        name = "tf_efficientnet_lite0"  # the zoo's weights load strictly into this timm architecture
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):]
    if name.startswith("local-dir:") or Path(name).expanduser().exists():
        return None
    try:
        from timm.models import get_pretrained_cfg

        config = get_pretrained_cfg(name)
    except Exception:  # an unknown tag or a hub id: timm has no entry for it
        config = None
    if config is not None and config.hf_hub_id:
        return config.hf_hub_id
    return name if name.count("/") == 1 else None


def export_transform(folder: Path):
    """timm's evaluation transform from an export folder's config.json (the preprocessing the model trained with)."""
    from timm.data import create_transform

    config = json.loads((Path(folder) / "config.json").read_text()).get("pretrained_cfg", {})
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{key: tuple(v) if isinstance(v, list) else v
                               for key, v in config.items() if key in keys}, is_training=False)


def timm_runner(folder: Path):
    """run(images, batch_size) through the plain timm model a user loads from the folder (`local-dir:`, its own eval
    transform, torch.inference_mode), with no finetune code."""
    import timm
    import torch
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(model), is_training=False)

    def run(images: list, batch_size: int):
        outputs = []
        for i in range(0, len(images), batch_size):
            with torch.inference_mode():
                outputs.append(model(torch.stack([transform(image) for image in images[i:i + batch_size]])))
        return outputs

    return run
