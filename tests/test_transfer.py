"""Transfer-learning controls: LoRA (peft), freezing schedules, layer-wise lr decay and cached features."""

from __future__ import annotations

import collections
import contextlib
import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import recipe_dict, to_recipe
from safetensors.torch import load_file
from test_vision_train import image_data, vision_raw  # noqa: F401 — a fixture, used by name

from finetune import transfer
from finetune.heads import ClassificationHead
from finetune.model import TimmClassifier, VisionClassifier, head_parameter_names
from finetune.tasks.text_classification.model import build_text_model
from finetune.optim import build_param_groups
from finetune.train import train


@pytest.fixture(autouse=True)
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def text_model(tiny_bert, tiny_data, tmp_path, **dotted):
    recipe = to_recipe(recipe_dict(tiny_bert, tiny_data, tmp_path / "run", **dotted))
    model, _ = build_text_model(recipe, ["food", "sports", "tech"])
    return model, recipe


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def read_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("head", [{}, {"head.type": "mlp", "head.hidden": [16], "head.pooling": "mean"}])
def test_lora_trains_only_adapters_and_the_head(tiny_bert, tiny_data, tmp_path, head):
    model, recipe = text_model(tiny_bert, tiny_data, tmp_path, lora={"r": 4}, **head)
    head_names = head_parameter_names(model)
    wrapped = transfer.apply_lora(model, recipe.lora)
    names = trainable(wrapped)
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)
    # every head weight is trained (and saved by peft), in the copy peft keeps for the adapter
    saved = {n.replace("base_model.model.", "").replace(".modules_to_save.default", "") for n in names}
    assert head_names <= saved
    assert {n for n in names if "lora_" in n} == {n for n in names if ".query." in n or ".value." in n}


def test_lora_auto_targets_for_timm_models():
    cnn = TimmClassifier(timm.create_model("test_efficientnet", num_classes=3))
    targets = transfer.lora_target_modules(cnn, "auto")
    convs = dict(cnn.named_modules())
    assert targets and all(convs[t].kernel_size == (1, 1) and convs[t].groups == 1 for t in targets)
    assert "model.classifier" not in targets
    vit = TimmClassifier(timm.create_model("test_vit", num_classes=3))
    targets = transfer.lora_target_modules(vit, "auto")
    assert targets and {t.rsplit(".", 1)[-1] for t in targets} == {"qkv", "proj"}
    assert not any("patch_embed" in t for t in targets)


def test_lora_head_named_head_does_not_catch_conv_head():
    """peft matches modules_to_save as name suffixes: a bare "head" would also train EfficientNet's conv_head."""
    backbone = timm.create_model("test_efficientnet", num_classes=0)
    model = VisionClassifier(backbone, ClassificationHead(backbone.num_features, 3, [], 0.0))
    lora = to_recipe(vision_raw({"train": "x", "validation": "y", "test": "z"}, Path("out"), lora={"r": 2})).lora
    wrapped = transfer.apply_lora(model, lora)
    assert not any("conv_head" in n and "lora_" not in n for n in trainable(wrapped))


def test_unknown_lora_target_is_bad_input(tiny_bert, tiny_data, tmp_path):
    model, recipe = text_model(tiny_bert, tiny_data, tmp_path, lora={"r": 4, "target_modules": ["qkv"]})
    with pytest.raises(Exception, match="lora.target_modules: no module named 'qkv'"):
        transfer.apply_lora(model, recipe.lora)


def test_merged_lora_outputs_equal_unmerged(tiny_bert, tiny_data, tmp_path):
    model, recipe = text_model(tiny_bert, tiny_data, tmp_path, lora={"r": 4})
    wrapped = transfer.apply_lora(model, recipe.lora).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero, where merging is trivially exact: move it
        for name, param in wrapped.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    batch = {"input_ids": torch.randint(5, 28, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    before = wrapped(**batch).logits
    plain = transfer.merged(wrapped)
    assert not transfer.is_lora(plain) and not any("lora_" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(**batch).logits, before, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def lora_run(tiny_bert, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    metrics = train(to_recipe(
        recipe_dict(tiny_bert, tiny_data, out, lora={"r": 4, "alpha": 8}, **{"train.epochs": 4, "train.lr": 3e-2})
    ))
    return out, metrics


def test_lora_run_exports_a_merged_native_model_and_the_adapter(lora_run, tiny_bert, tiny_data):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    out, metrics = lora_run
    assert metrics["test"]["accuracy"] > 1 / 3  # learns with adapters alone
    assert "M of" in (out / "train.log").read_text() and "trainable" in (out / "train.log").read_text()
    classify = pipeline("text-classification", model=str(out / "model"))
    assert classify("the soup of today")[0]["label"] in ("food", "sports", "tech")
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["modules_to_save"] == ["classifier"]
    # the adapter applied to the original backbone gives the merged model's logits
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    batch = tokenizer(["the soup of today", "a goal and match"], return_tensors="pt", padding=True)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(**batch).logits, merged(**batch).logits, atol=1e-5, rtol=1e-5)


def test_lora_on_a_timm_model_trains_and_exports_plain_timm(image_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    metrics = train(to_recipe(vision_raw(image_data, out, lora={"r": 4}, **{"train.epochs": 2})))
    assert metrics["best"]["accuracy"] > 0
    model = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Freezing


def test_frozen_backbone_weights_are_bit_identical_after_training(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    train(to_recipe(
        recipe_dict(tiny_bert, tiny_data, out, **{"train.freeze": "backbone", "train.cache_features": False})
    ))
    before = load_file(tiny_bert / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    compared = 0
    for name, tensor in before.items():
        exported = after.get(f"bert.{name}", after.get(name))
        if exported is not None:
            assert torch.equal(exported, tensor), name
            compared += 1
    assert compared == len(before)


def test_head_warmup_switches_at_the_right_epoch(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **{"train.freeze": {"head_warmup": 2}, "train.epochs": 3})))
    log = (out / "train.log").read_text().splitlines()
    switches = [line for line in log if line.startswith("epoch ") and ": training" in line]
    assert switches[0].startswith("epoch 1: training the head (")
    assert switches[1].startswith("epoch 3: training everything")
    assert len(switches) == 2


def test_staged_unfreezing_from_the_top(tiny_bert, tiny_data, tmp_path):
    recipe = to_recipe(recipe_dict(tiny_bert, tiny_data, tmp_path, **{"train.freeze": {"unfreeze_every": 2}}))
    top = 3  # embeddings 0, layers 1-2, pooler 3
    assert [transfer.trainable_depth(recipe, e, top) for e in range(1, 11)] == [4, 4, 3, 3, 2, 2, 1, 1, None, None]
    model, _ = build_text_model(recipe, ["a", "b", "c"])
    depths, found_top = transfer.layer_ids(model)
    assert found_top == top
    transfer.apply_freeze(model, 2, depths)
    names = trainable(model)
    assert any(".layer.1." in n for n in names) and any("pooler" in n for n in names)
    assert not any(".layer.0." in n or "embeddings" in n for n in names)
    assert head_parameter_names(model) <= names


def test_frozen_batchnorm_keeps_its_statistics():
    model = TimmClassifier(timm.create_model("test_efficientnet", num_classes=3))
    depths, top = transfer.layer_ids(model)
    transfer.apply_freeze(model, top + 1, depths)
    model.train()
    transfer.freeze_modes(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = [m.running_mean.clone() for m in norms]
    model(torch.randn(4, 3, 32, 32))
    assert all(not m.training for m in norms)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, norms))
    assert model.model.get_classifier().training


# ---------------------------------------------------------------------------------------------------------------
# Layer-wise lr decay


def test_layer_decay_groups_have_the_expected_lrs(tiny_bert, tiny_data, tmp_path):
    model, _ = build_text_model(to_recipe(recipe_dict(tiny_bert, tiny_data, tmp_path)), ["a", "b", "c"])
    depths, top = transfer.layer_ids(model)
    groups = build_param_groups(model, 1.0, 10.0, 0.01, head_parameter_names(model), depths, 0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == 10.0
    assert lr_of[id(named["bert.pooler.dense.weight"])] == 0.5  # the top (3), just below the head
    assert lr_of[id(named["bert.encoder.layer.1.output.dense.weight"])] == 0.25  # depth 2
    assert lr_of[id(named["bert.encoder.layer.1.output.LayerNorm.bias"])] == 0.25
    assert lr_of[id(named["bert.encoder.layer.0.output.dense.weight"])] == 0.125
    assert lr_of[id(named["bert.embeddings.word_embeddings.weight"])] == 0.0625
    assert len(lr_of) == len(named)


def test_layer_decay_uses_timms_group_matcher():
    model = TimmClassifier(timm.create_model("test_efficientnet", num_classes=3))
    depths, top = transfer.layer_ids(model)
    assert depths["model.conv_stem.weight"] == 0
    assert 0 < depths["model.blocks.0.0.conv.weight"] < depths["model.blocks.1.0.conv_pwl.weight"] <= top
    groups = build_param_groups(model, 1.0, None, 0.0, head_parameter_names(model), depths, 0.8)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head"] == 1.0 and lrs["backbone_layer0"] == pytest.approx(0.8 ** (top + 1))


# ---------------------------------------------------------------------------------------------------------------
# Cached features


@pytest.mark.parametrize("pooling", ["mean", "auto"])
def test_cached_feature_training_equals_training_through_the_frozen_backbone(tiny_bert, tiny_data, tmp_path, pooling):
    runs = {}
    for cache in (True, False):
        out = tmp_path / f"cache-{cache}"
        dotted = {"train.freeze": "backbone", "train.cache_features": cache, "head.pooling": pooling,
                  "head.dropout": 0.2, "train.epochs": 3, "train.lr": 3e-2}
        runs[cache] = (train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **dotted))), out)
    (cached, cached_out), (plain, plain_out) = runs[True], runs[False]
    assert "cached features" in (cached_out / "train.log").read_text()
    assert "cached features" not in (plain_out / "train.log").read_text()
    for a, b in zip(cached["epochs"], plain["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["validation"]["loss"] == pytest.approx(b["validation"]["loss"], abs=1e-5)
    a, b = load_file(cached_out / "model" / "model.safetensors"), load_file(plain_out / "model" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


def test_a_second_run_reads_the_cached_features(tiny_bert, tiny_data, tmp_path, feature_cache):
    dotted = {"train.freeze": "backbone", "head.pooling": "mean"}
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, tmp_path / "first", **dotted)))
    assert "computing train features" in (tmp_path / "first" / "train.log").read_text()
    files = sorted(feature_cache.rglob("*.safetensors"))
    assert len(files) == 3  # train, validation, test
    first = tmp_path / "first" / "checkpoints"
    saved = [
        load_file(path) for path in (*first.glob("step-*/model.safetensors"), first / "best" / "model.safetensors")
    ]
    assert saved and all(sorted(s) == ["model.head.output.bias", "model.head.output.weight"] for s in saved)
    dotted |= {"head.type": "mlp", "head.hidden": [8], "train.lr": 1e-2}  # other head settings, same features
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, tmp_path / "second", **dotted)))
    log = (tmp_path / "second" / "train.log").read_text()
    assert "computing" not in log and "cached features" in log
    assert sorted(feature_cache.rglob("*.safetensors")) == files


def test_cached_features_on_images_equal_the_uncached_run(image_data, tmp_path):  # noqa: F811
    off = {"augment.scale": [1.0, 1.0], "augment.hflip": 0.0, "train.freeze": "backbone", "train.epochs": 2,
           "backbone.dropout": 0.3}
    results = {}
    for cache in (True, False):
        out = tmp_path / f"cache-{cache}"
        results[cache] = train(to_recipe(vision_raw(image_data, out, **off, **{"train.cache_features": cache})))
        assert ("cached features" in (out / "train.log").read_text()) == cache
    for a, b in zip(results[True]["epochs"], results[False]["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert results[True]["test"]["loss"] == pytest.approx(results[False]["test"]["loss"], abs=1e-5)


def test_augmentation_rules_out_the_cache(image_data, tmp_path):  # noqa: F811
    raw = vision_raw(image_data, tmp_path / "run", **{"train.freeze": "backbone", "train.cache_features": True,
                                                     "augment.hflip": 0.5, "train.epochs": 1})
    with pytest.raises(Exception, match="train.cache_features: cannot cache features: augmentation"):
        train(to_recipe(raw))


# ---------------------------------------------------------------------------------------------------------------
# Speed and memory switches


def test_frozen_word_embeddings_stay_as_pretrained(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, out, **{"train.freeze_embeddings": True})))
    before, after = load_file(tiny_bert / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    name = "embeddings.word_embeddings.weight"
    assert torch.equal(after[f"bert.{name}"], before[name])
    assert not torch.equal(
        after["bert.encoder.layer.0.output.dense.weight"], before["encoder.layer.0.output.dense.weight"]
    )


@contextlib.contextmanager
def training_forwards():
    """Counts of forward calls made with grad enabled in training mode, per module class, by every module: a layer
    whose activations are recomputed in the backward pass is called twice per step."""
    counts: collections.Counter = collections.Counter()

    def hook(module, args):  # before the forward: a recomputation stops as soon as it has what backward needs
        if module.training and torch.is_grad_enabled():
            counts[type(module).__name__] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


def checkpointed_runs(make_raw, tmp_path, layer: str) -> list[dict]:
    """The same run without and with train.gradient_checkpointing; asserts the switch recomputed `layer`."""
    runs, calls = [], []
    for on in (False, True):
        with training_forwards() as counts:
            runs.append(train(to_recipe(make_raw(tmp_path / str(on), on))))
        calls.append(counts[layer])
    assert calls[0] > 0 and calls[1] == 2 * calls[0], (layer, calls)  # each training forward once more, backward
    return runs


@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_training(tiny_bert, tiny_data, tmp_path, lora):
    def make_raw(out, on):
        return recipe_dict(tiny_bert, tiny_data, out, **{"train.gradient_checkpointing": on, "lora": lora})

    runs = checkpointed_runs(make_raw, tmp_path, "BertAttention")
    for a, b in zip(runs[0]["epochs"], runs[1]["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_gradient_checkpointing_on_timm_recomputes_the_blocks(image_data, tmp_path):  # noqa: F811 — the fixture
    def make_raw(out, on):
        # one memory format for both (a CPU run would otherwise time its layouts first, with forwards of its own)
        return vision_raw(image_data, out, **{"train.epochs": 1, "train.gradient_checkpointing": on,
                                              "train.channels_last": False})

    runs = checkpointed_runs(make_raw, tmp_path, "InvertedResidual")
    assert runs[0]["epochs"][0]["loss"] == pytest.approx(runs[1]["epochs"][0]["loss"], abs=1e-5)


def compiled_runs(make_raw, tmp_path) -> list[dict]:
    """The same run eager and with train.compile; asserts dynamo really compiled graphs in the second only."""
    import torch._dynamo

    runs, graphs = [], []
    for on in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        runs.append(train(to_recipe(make_raw(tmp_path / str(on), on))))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] == 0 and graphs[1] >= 1, graphs
    return runs


@pytest.mark.slow  # compiling takes a minute or two on 2 cores
@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["full", "lora"])
def test_compiled_training_matches_eager(tiny_bert, tiny_data, tmp_path, lora):
    def make_raw(out, on):
        return recipe_dict(tiny_bert, tiny_data, out, **{"train.compile": on, "lora": lora})

    runs = compiled_runs(make_raw, tmp_path)
    for a, b in zip(runs[0]["epochs"], runs[1]["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert sorted(load_file(tmp_path / "True" / "model" / "model.safetensors")) == sorted(
        load_file(tmp_path / "False" / "model" / "model.safetensors"))


@pytest.mark.slow
def test_compiled_timm_training_matches_eager(image_data, tmp_path):  # noqa: F811 — the fixture
    def make_raw(out, on):
        return vision_raw(image_data, out, **{"train.epochs": 1, "train.compile": on})

    runs = compiled_runs(make_raw, tmp_path)
    # inductor fuses the BatchNorm/activation math in another order: float rounding that a tiny CNN's updates grow
    # to ~1% of the epoch loss (1.243 vs 1.255 here); a model that compiled something else would be far off
    assert runs[0]["epochs"][0]["loss"] == pytest.approx(runs[1]["epochs"][0]["loss"], rel=0.03)


def test_features_computed_longest_first_come_back_in_row_order(tiny_bert, tiny_data, tmp_path):
    from finetune.tasks.text_classification import tokens as data_module
    from finetune.backbones import load_tokenizer
    from finetune.tasks.batching import longest_first as _longest_first

    model, recipe = text_model(tiny_bert, tiny_data, tmp_path, **{"head.pooling": "mean", "train.freeze": "backbone"})
    tokenizer = load_tokenizer(str(tiny_bert), False)
    texts = ["bread", "the goal of the match today", "a chip", "very good news story of the robot and data"] * 3
    dataset = data_module.tokenize_texts({"text": texts, "label": [0] * len(texts)}, tokenizer, 16)
    features_fn = transfer.feature_function(model)
    sorted_loader = data_module.make_text_loader(dataset, tokenizer, 4, False, 0, _longest_first(dataset))
    plain_loader = data_module.make_text_loader(dataset, tokenizer, 1, False, 0)  # one row a batch: no padding at all
    assert list(iter(sorted_loader.sampler)) != list(range(len(texts)))
    fast = transfer.compute_features(model, features_fn, sorted_loader, "cpu")
    exact = transfer.compute_features(model, features_fn, plain_loader, "cpu")
    torch.testing.assert_close(fast, exact, atol=1e-5, rtol=1e-5)
