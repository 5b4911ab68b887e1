"""Vision models: the efficientnet-lite0 zoo weights, timm native and kit models, dropout, export round trips."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import LABELS, subprocess_env, to_recipe
from torch import nn

from finetune.backbones import create_vision_backbone, efficientnet_lite0_state_dict
from finetune.errors import FinetuneError
from finetune.loading import load_model_folder
from finetune.model import (
    TimmClassifier,
    VisionClassifier,
    fold_target_scaling,
    head_parameter_names,
    output_layer,
    timm_model_of,
)
from finetune.tasks.image_classification.model import build_vision_model, save_vision_model

# Tiny timm architectures from its own registry (random weights: nothing is downloaded). test_efficientnet is a
# CNN (any input size), test_vit a fixed-size ViT (a new image size rebuilds its position embedding).
CNN, VIT = "test_efficientnet", "test_vit"


def vision_recipe(name: str = CNN, **dotted):
    raw = {
        "task": "image-classification",
        "backbone": {"name": name, "pretrained": False, "dropout": 0.0},
        "head": {"type": "linear", "dropout": 0.0},
        "data": {"train": "unused-folder"},
    }
    for key, value in dotted.items():
        section, field = key.split(".")
        raw.setdefault(section, {})[field] = value
    return to_recipe(raw)


def build(name: str = CNN, labels=LABELS, **dotted):
    model, data_config = build_vision_model(vision_recipe(name, **dotted), labels)
    return model.eval(), data_config


def pixels(data_config: dict, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *data_config["input_size"], generator=torch.Generator().manual_seed(0))


def sample_image(name: str):
    from PIL import Image
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name))


# ---------------------------------------------------------------------------------------------------------------
# The offline zoo: efficientnet-lite0 from its pip package.


def test_zoo_weights_load_strictly_into_timm_after_the_rename():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = model.load_state_dict(efficientnet_lite0_state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert model.pretrained_cfg["mean"] == model.pretrained_cfg["std"] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "image, plausible",
    [
        # a Chinese palace by a lake: top-5 here is palace, bell cote, monastery, lakeside, boathouse
        ("china.jpg", {"palace", "monastery", "bell cote, bell cot", "stupa, tope", "church, church building"}),
        # a daisy with an insect on it: top-5 here is daisy, bee, mushroom, sea anemone, ant
        ("flower.jpg", {"daisy", "bee", "pot, flowerpot", "vase"}),
    ],
)
def test_zoo_model_classifies_real_photos_with_its_imagenet_head(image, plausible):
    from timm.data import ImageNetInfo, create_transform, resolve_model_data_config

    model = create_vision_backbone(vision_recipe("efficientnet-lite0", **{"backbone.pretrained": True}), 1000).eval()
    config = resolve_model_data_config(model)
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)  # the preprocessing travels with the model
    transform = create_transform(**config, is_training=False)
    with torch.no_grad():
        probabilities = model(transform(sample_image(image))[None]).softmax(-1)[0]
    info = ImageNetInfo()
    top5 = [info.index_to_description(int(i)) for i in probabilities.topk(5).indices]
    print(image, top5)
    assert top5[0] in plausible
    assert probabilities.max() > 0.2


def test_zoo_pretrained_false_is_the_same_architecture_with_random_weights():
    saved = efficientnet_lite0_state_dict()
    pretrained, _ = build("efficientnet-lite0", **{"backbone.pretrained": True})
    scratch, _ = build("efficientnet-lite0", **{"backbone.pretrained": False})
    a, b = pretrained.model.state_dict(), scratch.model.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert torch.equal(a["conv_stem.weight"], saved["conv_stem.weight"])
    assert torch.equal(a["blocks.6.0.conv_pwl.weight"], saved["blocks.6.0.conv_pwl.weight"])
    assert not torch.allclose(b["conv_stem.weight"], saved["conv_stem.weight"])
    assert a["classifier.weight"].shape == (3, 1280)  # the task's head, not ImageNet's


# ---------------------------------------------------------------------------------------------------------------
# Native (timm's own classifier) and kit (our head) models.


@pytest.mark.parametrize("name", [CNN, VIT])
def test_linear_auto_head_is_timm_own_classifier(name):
    model, data_config = build(name)
    assert isinstance(model, TimmClassifier)
    assert model.model.num_classes == 3
    assert model(pixel_values=pixels(data_config)).shape == (2, 3)
    classifier = model.model.get_classifier()
    assert output_layer(model) is classifier
    names = {n for n, p in model.named_parameters() if any(p is q for q in classifier.parameters())}
    assert head_parameter_names(model) == names and len(names) == 2


@pytest.mark.parametrize(
    "name, head",
    [(CNN, {"type": "mlp", "hidden": [16, 8]}), (VIT, {"type": "mlp", "hidden": [16]}), (VIT, {"pooling": "mean"})],
)
def test_mlp_head_or_other_pooling_builds_the_kit_model(name, head):
    model, data_config = build(name, **{f"head.{k}": v for k, v in head.items()})
    assert isinstance(model, VisionClassifier)
    assert model.backbone.num_classes == 0  # no unused classifier weights
    widths = [m.out_features for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert widths == [*head.get("hidden", []), 3]
    assert head_parameter_names(model) == {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert output_layer(model) is model.head.output
    assert model(pixel_values=pixels(data_config)).shape == (2, 3)
    if head.get("pooling") == "mean":
        assert model.backbone.global_pool == "avg"


def test_kit_model_is_timm_pooled_features_then_our_head():
    model, data_config = build(VIT, **{"head.type": "mlp", "head.hidden": [8]})
    x = pixels(data_config)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x), model.head(model.backbone(x)), atol=1e-6)


@pytest.mark.parametrize("head", [{}, {"type": "mlp", "hidden": [8]}])
@pytest.mark.parametrize("problem, labels, outputs", [("multi_label", LABELS, 3), ("regression", None, 1)])
def test_problem_sets_the_number_of_outputs(head, problem, labels, outputs):
    model, data_config = build(labels=labels, **{"head.problem": problem, **{f"head.{k}": v for k, v in head.items()}})
    assert output_layer(model).out_features == outputs
    assert model(pixel_values=pixels(data_config)).shape == (2, outputs)


@pytest.mark.parametrize("head", [{}, {"type": "mlp", "hidden": [8]}])
def test_fold_target_scaling_makes_outputs_in_target_units(head):
    dotted = {"head.problem": "regression", **{f"head.{k}": v for k, v in head.items()}}
    model, data_config = build(labels=None, **dotted)
    x = pixels(data_config)
    with torch.no_grad():
        standardised = model(pixel_values=x)
        fold_target_scaling(model, mean=100.0, std=4.0)
        assert torch.allclose(model(pixel_values=x), standardised * 4.0 + 100.0, atol=1e-4)


def test_dropout_and_drop_path_reach_the_timm_model():
    from timm.layers import DropPath

    native, _ = build(VIT, **{"backbone.dropout": 0.27, "backbone.drop_path": 0.2})
    assert native.model.head_drop.p == 0.27  # ViT: drop_rate is the dropout in front of its head
    rates = [m.drop_prob for m in native.model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)  # timm ramps stochastic depth up to the rate

    kit, _ = build(CNN, **{"backbone.dropout": 0.27, "head.type": "mlp", "head.hidden": [8], "head.dropout": 0.13})
    assert kit.backbone.drop_rate == 0.27
    assert {m.p for m in kit.head.modules() if isinstance(m, nn.Dropout)} == {0.13}


@pytest.mark.parametrize("head", [{}, {"type": "mlp", "hidden": [8]}])
def test_channels_last_gives_the_same_logits(head):
    model, data_config = build(CNN, **{f"head.{k}": v for k, v in head.items()})
    assert timm_model_of(model) is (model.model if isinstance(model, TimmClassifier) else model.backbone)
    x = pixels(data_config)
    with torch.no_grad():
        expected = model(pixel_values=x)
        model.to(memory_format=torch.channels_last)  # what the trainer does for CNNs on GPUs
        assert torch.allclose(model(pixel_values=x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)


def test_image_size_sets_the_data_config_and_a_vit_input_size():
    _, default = build(VIT)
    assert default["input_size"] == (3, 160, 160)  # the model's pretrained config
    model, data_config = build(VIT, **{"data.image_size": 64})
    assert data_config["input_size"] == (3, 64, 64)
    assert data_config["mean"] == (0.5, 0.5, 0.5)
    assert model(pixel_values=pixels(data_config)).shape == (2, 3)  # a fixed-size ViT rebuilt for 64 px


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the key and what to do.


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(FinetuneError, match=r"backbone\.name: 'resnet1888'.*did you mean.*resnet18") as error:
        build("resnet1888")
    assert "\n" not in str(error.value)
    with pytest.raises(FinetuneError, match="did you mean 'efficientnet-lite0'"):
        build("efficientnet-lite")


def test_missing_pretrained_weights_offline_say_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(FinetuneError, match=r"backbone\.name: cannot load 'test_vit'.*pretrained=false") as error:
        build(VIT, **{"backbone.pretrained": True})
    assert "\n" not in str(error.value)


def test_class_token_pooling_on_a_cnn_is_a_pooling_error():
    with pytest.raises(FinetuneError, match=r"head\.pooling"):
        build(CNN, **{"head.pooling": "cls"})


# ---------------------------------------------------------------------------------------------------------------
# Export: timm's own folder (loads with finetune absent) and the kit format (loads through finetune.load).

TIMM_ONLY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["finetune"] = None  # any import of finetune now fails: the folder must stand on its own
    import timm, torch
    from safetensors.torch import load_file

    model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
    expected = load_file(sys.argv[2])
    with torch.no_grad():
        logits = model(expected["pixel_values"])
    print(json.dumps({
        "close": torch.allclose(logits, expected["logits"], atol=1e-5),
        "num_classes": model.num_classes,
        "label_names": list(model.pretrained_cfg.get("label_names") or []),
        "input_size": list(timm.data.resolve_model_data_config(model)["input_size"]),
    }))
    """
)


@pytest.mark.parametrize("name, image_size", [(CNN, 96), (VIT, 64)])
def test_native_export_loads_in_timm_without_finetune(tmp_path, name, image_size):
    from safetensors.torch import save_file

    recipe = vision_recipe(name, **{"data.image_size": image_size})
    model, data_config = build_vision_model(recipe, LABELS)
    model.eval()
    x = pixels(data_config)
    with torch.no_grad():
        logits = model(pixel_values=x)
    save_vision_model(model, tmp_path / "model", recipe, LABELS, data_config)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 3 and config["label_names"] == LABELS
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, image_size, image_size]
    assert {"mean", "std", "crop_pct", "interpolation"} <= set(cfg)
    save_file({"pixel_values": x, "logits": logits}, tmp_path / "expected.safetensors")

    script = tmp_path / "timm_only.py"
    script.write_text(TIMM_ONLY_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "expected.safetensors")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"close": True, "num_classes": 3, "label_names": LABELS, "input_size": [3, image_size, image_size]}


def test_native_export_loads_through_finetune_load(tmp_path):
    recipe = vision_recipe(CNN, **{"head.problem": "multi_label", "head.threshold": 0.3})
    model, data_config = build_vision_model(recipe, LABELS)
    save_vision_model(model.eval(), tmp_path, recipe, LABELS, data_config)
    loaded, transform, spec = load_model_folder(tmp_path)
    assert isinstance(loaded, TimmClassifier)
    assert spec == {
        "format": "timm", "task": "image-classification", "problem": "multi_label", "labels": LABELS, "threshold": 0.3
    }
    image = transform(sample_image("flower.jpg"))
    assert image.shape == (3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=image[None]), model(pixel_values=image[None]), atol=1e-5)


def test_kit_export_round_trips_through_finetune_load(tmp_path):
    recipe = vision_recipe(VIT, **{"head.type": "mlp", "head.hidden": [8], "data.image_size": 64})
    model, data_config = build_vision_model(recipe, LABELS)
    model.eval()
    save_vision_model(model, tmp_path, recipe, LABELS, data_config)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "finetune.json"}
    loaded, transform, spec = load_model_folder(tmp_path)
    assert isinstance(loaded, VisionClassifier)
    assert spec["format"] == "finetune" and spec["task"] == "image-classification" and spec["labels"] == LABELS
    image = transform(sample_image("china.jpg"))
    assert image.shape == (3, 64, 64)  # the training image size travels in the backbone's config
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=image[None]), model(pixel_values=image[None]), atol=1e-5)


@pytest.mark.parametrize("activation", [nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish])
def test_an_in_place_activation_that_reads_its_input_copies_it_and_out_of_place_gives_the_same_gradients(activation):
    from torch.profiler import ProfilerActivity, profile

    from finetune.tasks.image_classification.model import COPIED_IN_PLACE, activations_out_of_place

    assert issubclass(activation, COPIED_IN_PLACE)
    layer = nn.Linear(8, 8)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * 4
    results = {}
    for inplace in (True, False):
        layer.zero_grad()
        model = nn.Sequential(layer, activation(inplace=True))
        if not inplace:
            assert activations_out_of_place(model) == 1 and not model[1].inplace
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = model(x)
        copied = any(event.key == "aten::clone" for event in prof.key_averages())
        assert copied == inplace  # the reason for the switch: torch's in-place form copies, the plain one does not
        out.square().sum().backward()
        results[inplace] = (out.detach(), layer.weight.grad.clone())
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][1], results[False][1])


def test_a_built_vision_model_trains_its_activations_out_of_place():
    import timm

    from finetune.tasks.image_classification.model import COPIED_IN_PLACE

    plain = [m for m in timm.create_model(CNN, pretrained=False).modules() if isinstance(m, COPIED_IN_PLACE)]
    assert plain and all(m.inplace for m in plain)  # timm builds them in place
    model, _ = build(CNN)
    built = [m for m in model.modules() if isinstance(m, COPIED_IN_PLACE)]
    assert len(built) == len(plain) and not any(m.inplace for m in built)
