"""Image classification's model: built from the recipe, saved as timm's folder or finetune's, loaded back."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from finetune.backbones import TIMM_POOLING, create_vision_backbone
from finetune.heads import ClassificationHead
from finetune.model import (
    TIMM_CONFIG_KEY,
    TimmClassifier,
    VisionClassifier,
    is_kit_model,
    is_native,
    num_outputs,
    read_folder_config,
    read_kit_spec,
    save_kit_weights_and_spec,
)


def build_vision_model(recipe, label_names: list[str] | None):
    """(model, data_config) for the recipe; data_config is timm's preprocessing for it (input_size, mean, std, ...)."""
    outputs = num_outputs(recipe.head.problem, label_names)
    if is_native(recipe):
        backbone = create_vision_backbone(recipe, outputs)
        model = TimmClassifier(backbone, recipe.backbone.dropout or 0.0)
    else:
        backbone = create_vision_backbone(recipe, 0, global_pool=TIMM_POOLING[recipe.head.pooling])
        width = getattr(backbone, "head_hidden_size", backbone.num_features)  # what pre_logits returns
        model = VisionClassifier(backbone, ClassificationHead(width, outputs, recipe.head.hidden, recipe.head.dropout))
    activations_out_of_place(model)
    return model, vision_data_config(backbone, recipe.data.image_size)


# Activations whose backward reads their input: called in place on a tensor that needs a gradient, autograd first
# copies the whole input to keep it (aten::clone inside the call), where the plain call only writes its output. Same
# values and gradients, the same memory (the input is kept either way), one pass over the activation less: ReLU6
# (timm's EfficientNet-Lite, MobileNetV2), SiLU (EfficientNet), Hardswish (MobileNetV3). ReLU, LeakyReLU and ELU
# read their output and copy nothing: they stay in place.
COPIED_IN_PLACE = (nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Threshold)  # ReLU6 is a Hardtanh


def activations_out_of_place(model: nn.Module) -> int:
    """Set the COPIED_IN_PLACE activations of the model to out of place; returns how many were in place."""
    flipped = 0
    for module in model.modules():
        if isinstance(module, COPIED_IN_PLACE) and getattr(module, "inplace", False):
            module.inplace = False
            flipped += 1
    return flipped


def vision_data_config(timm_model: nn.Module, image_size: int | None = None) -> dict:
    """timm's preprocessing from the model's pretrained_cfg, at image_size when one is given."""
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(timm_model, args={"img_size": image_size} if image_size else None)


def save_vision_model(model: nn.Module, directory: Path, recipe, label_names: list[str] | None, data_config: dict):
    """timm's own folder when native (config.json + model.safetensors); else backbone config + weights + finetune.json.

    Either way config.json's pretrained_cfg holds the preprocessing the model was trained with (data_config), so
    `timm.create_model("local-dir:...")` and `resolve_model_data_config` give back the training image size.
    """
    from timm.models import save_for_hf
    from timm.models._hub import save_config_for_hf  # what save_for_hf writes config.json with; not re-exported

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not is_kit_model(model):
        extra = {TIMM_CONFIG_KEY: {"problem": recipe.head.problem, "threshold": recipe.head.threshold}}
        if label_names:
            extra["label_names"] = list(label_names)
        save_for_hf(model.model, directory, model_config=extra, safe_serialization=True, data_config=data_config)
        return
    # the kit's config.json describes the backbone alone (num_classes 0); labels and head live in finetune.json
    save_config_for_hf(model.backbone, directory / "config.json", data_config=data_config)
    save_kit_weights_and_spec(model, directory, recipe, label_names)


def is_timm_folder(directory: Path) -> bool:
    """timm's config (it names one `architecture`): a timm model, or a timm backbone with finetune's head."""
    return "architecture" in read_folder_config(directory)


def eval_transform(timm_model: nn.Module):
    """timm's evaluation transform for the model's preprocessing (its pretrained_cfg)."""
    from timm.data import create_transform, resolve_model_data_config

    return create_transform(**resolve_model_data_config(timm_model), is_training=False)


def load_vision_model(directory: Path):
    """(model, image transform, spec) from a timm folder or a timm backbone in finetune's own format; the model is
    called as `model(pixel_values=...)`."""
    spec = read_kit_spec(directory)
    return load_timm(directory) if spec is None else load_vision_kit(directory, spec)


def load_timm(directory: Path):
    """(TimmClassifier, image transform, spec) from timm's own folder, with the kit's problem and threshold block."""
    import timm

    model = timm.create_model(f"local-dir:{directory.resolve()}", pretrained=True)
    config = read_folder_config(directory)
    extra = config.get(TIMM_CONFIG_KEY, {})
    labels = config.get("label_names")
    if isinstance(labels, dict):  # timm allows {index: name}
        labels = [labels[key] for key in sorted(labels, key=int)]
    spec = {
        "format": "timm",
        "task": "image-classification",
        "problem": extra.get("problem", "single_label"),
        "labels": labels,
        "threshold": extra.get("threshold", 0.5),
    }
    return TimmClassifier(model).eval(), eval_transform(model), spec


def load_vision_kit(directory: Path, spec: dict):
    """(VisionClassifier, image transform, spec) from a timm backbone's config and finetune's weights and spec."""
    import timm
    from safetensors.torch import load_file

    backbone = timm.create_model(f"local-dir:{directory.resolve()}", pretrained=False)  # weights below
    width = getattr(backbone, "head_hidden_size", backbone.num_features)
    model = VisionClassifier(backbone, ClassificationHead(width, spec["num_outputs"], spec["head"]["hidden"]))
    model.load_state_dict(load_file(directory / "model.safetensors"))
    return model.eval(), eval_transform(backbone), spec
