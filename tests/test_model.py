"""Model building: dropout reaching the config, pretrained vs random weights, native vs kit heads, pooling, scaling."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import LABELS, to_recipe
from safetensors.torch import load_file
from torch import nn

from finetune.heads import ClassificationHead, pool
from finetune.model import TextClassifier, fold_target_scaling, head_parameter_names, is_native
from finetune.tasks.text_classification.model import build_text_model


def build(make_recipe, labels=LABELS, **dotted):
    return build_text_model(to_recipe(make_recipe(**dotted)), labels)


def dropout_rates(module: nn.Module) -> set[float]:
    return {m.p for m in module.modules() if isinstance(m, nn.Dropout)}


def test_backbone_and_head_dropout_reach_the_native_model(make_recipe):
    model, _ = build(make_recipe, **{"backbone.dropout": 0.27, "head.dropout": 0.13})
    config = model.config
    assert config.hidden_dropout_prob == 0.27
    assert config.attention_probs_dropout_prob == 0.27
    assert config.classifier_dropout == 0.13
    # and the modules really use them, not just the config
    assert model.dropout.p == 0.13
    assert dropout_rates(model.bert) == {0.27}


def test_null_backbone_dropout_keeps_the_saved_config(make_recipe, tiny_bert):
    model, _ = build(make_recipe, **{"backbone.dropout": None})
    assert model.config.hidden_dropout_prob == 0.1  # as saved by the tiny_bert fixture
    assert model.config.attention_probs_dropout_prob == 0.1


def test_head_dropout_reaches_the_kit_head(make_recipe):
    model, _ = build(
        make_recipe, **{"backbone.dropout": 0.2, "head.dropout": 0.35, "head.type": "mlp", "head.hidden": [16]}
    )
    assert isinstance(model, TextClassifier)
    assert dropout_rates(model.head) == {0.35}
    assert dropout_rates(model.backbone) == {0.2}
    assert model.backbone.config.hidden_dropout_prob == 0.2


def test_native_linear_head_is_the_transformers_class_with_label_names(make_recipe):
    recipe = to_recipe(make_recipe(**{"head.type": "linear", "head.pooling": "auto"}))
    assert is_native(recipe)
    model, tokenizer = build_text_model(recipe, LABELS)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3
    assert model.config.id2label == dict(enumerate(LABELS))
    assert model.config.label2id == {name: i for i, name in enumerate(LABELS)}
    assert model.config.problem_type == "single_label_classification"
    assert tokenizer.pad_token_id == model.config.pad_token_id
    assert head_parameter_names(model) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize(
    "problem, labels, outputs, problem_type",
    [("multi_label", LABELS, 3, "multi_label_classification"), ("regression", None, 1, "regression")],
)
def test_problem_type_and_outputs(make_recipe, problem, labels, outputs, problem_type):
    model, _ = build(make_recipe, labels=labels, **{"head.problem": problem})
    assert model.config.problem_type == problem_type
    assert model.classifier.out_features == outputs


@pytest.mark.parametrize(
    "head",
    [{"type": "mlp", "hidden": [16, 8]}, {"type": "linear", "pooling": "mean"}, {"type": "linear", "pooling": "cls"}],
)
def test_heads_without_a_native_class_build_the_kit_model(make_recipe, head):
    model, _ = build(make_recipe, **{f"head.{k}": v for k, v in head.items()})
    assert isinstance(model, TextClassifier)
    widths = [m.out_features for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert widths == [*head.get("hidden", []), 3]
    assert head_parameter_names(model) == {name for name, _ in model.named_parameters() if name.startswith("head.")}
    if head.get("pooling", "auto") != "auto":
        assert model.backbone.pooler is None  # unused weights: no optimizer state, no stalled DDP sync
    batch = {
        "input_ids": torch.tensor([[2, 5, 20, 3], [2, 6, 3, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    }
    assert model(**batch).shape == (2, 3)


def test_pretrained_false_is_the_same_architecture_with_random_weights(make_recipe, tiny_bert):
    saved = load_file(tiny_bert / "model.safetensors")
    pretrained, _ = build(make_recipe, **{"backbone.pretrained": True})
    scratch, _ = build(make_recipe, **{"backbone.pretrained": False})
    a, b = pretrained.state_dict(), scratch.state_dict()
    assert type(pretrained) is type(scratch)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    for name, tensor in saved.items():
        assert torch.equal(a[f"bert.{name}"], tensor), name  # pretrained: the saved weights
    matrices = [name for name in saved if saved[name].ndim == 2]
    assert matrices and all(not torch.allclose(b[f"bert.{name}"], saved[name]) for name in matrices)


def test_pretrained_false_for_the_kit_model(make_recipe, tiny_bert):
    saved = load_file(tiny_bert / "model.safetensors")
    scratch, _ = build(make_recipe, **{"backbone.pretrained": False, "head.type": "mlp", "head.hidden": [8]})
    weight = scratch.backbone.embeddings.word_embeddings.weight
    assert weight.shape == saved["embeddings.word_embeddings.weight"].shape
    assert not torch.allclose(weight, saved["embeddings.word_embeddings.weight"])


def test_mean_pooling_ignores_padding():
    states = torch.randn(2, 4, 5)
    outputs = types.SimpleNamespace(last_hidden_state=states, pooler_output=None)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    pooled = pool(outputs, mask, "mean")
    assert torch.allclose(pooled[0], states[0].mean(0))
    assert torch.allclose(pooled[1], states[1, :2].mean(0))
    assert torch.equal(pool(outputs, mask, "cls"), states[:, 0])


def test_auto_pooling_uses_the_backbone_pooler_output():
    outputs = types.SimpleNamespace(last_hidden_state=torch.randn(2, 3, 4), pooler_output=torch.randn(2, 4))
    assert torch.equal(pool(outputs, None, "auto"), outputs.pooler_output)


def test_fold_target_scaling_makes_outputs_in_target_units(make_recipe):
    model, _ = build(make_recipe, labels=None, **{"head.problem": "regression"})
    model.eval()
    batch = {"input_ids": torch.tensor([[2, 5, 20, 3], [2, 9, 14, 3]])}
    with torch.no_grad():
        standardised = model(**batch).logits
        fold_target_scaling(model, mean=100.0, std=4.0)
        folded = model(**batch).logits
    assert torch.allclose(folded, standardised * 4.0 + 100.0, atol=1e-4)


def test_classification_head_layers():
    head = ClassificationHead(32, 3, [16], dropout=0.0)
    assert [type(m) for m in head.hidden] == [nn.Dropout, nn.Linear, nn.GELU]
    assert head(torch.randn(5, 32)).shape == (5, 3)


def _interface_kinds(make_recipe):
    """(model, batch) for every kind the interface covers: the native transformers class, the kit's text head, timm's
    own classifier, a timm backbone with the kit's head."""
    import timm

    from finetune.model import TimmClassifier, VisionClassifier

    text = {"input_ids": torch.tensor([[2, 5, 20, 3], [2, 6, 3, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    images = {"pixel_values": torch.randn(2, 3, 32, 32)}
    backbone = timm.create_model("test_efficientnet", num_classes=0)
    return [
        (build(make_recipe)[0], text),
        (build(make_recipe, **{"head.type": "mlp", "head.hidden": [16]})[0], text),
        (TimmClassifier(timm.create_model("test_efficientnet", num_classes=3), head_dropout=0.5), images),
        (VisionClassifier(backbone, ClassificationHead(backbone.num_features, 3, [8])), images),
    ]


def test_every_model_kind_answers_the_one_interface(make_recipe):
    from finetune.loop import logits_of
    from finetune.model import ModelInterface, interface_of
    from finetune.transfer import CachedHead

    for model, batch in _interface_kinds(make_recipe):
        model.eval()
        kind = interface_of(model)
        assert isinstance(kind, ModelInterface)
        names = [n for n, _ in model.named_parameters()]
        head = kind.head_parameter_names()
        assert head and head < set(names)
        assert {id(p) for p in kind.output_layer().parameters()} <= {id(p) for n, p in model.named_parameters()
                                                                      if n in head}
        backbone = [n for n in names if n not in head]
        depths, top = kind.layer_ids(backbone)
        assert len(depths) == len(backbone) and min(depths) == 0 and max(depths) == top > 0
        assert kind.model_to_save() is model and kind.library_model() is not None
        assert kind.separable_head()
        with torch.no_grad():
            features = kind.features(dict(batch))
            torch.testing.assert_close(kind.head_on_features(features), logits_of(model(**batch)))
            cached = CachedHead(model).eval()
            torch.testing.assert_close(cached(features), kind.head_on_features(features))
        assert cached.on_features and not kind.on_features
        assert cached.model_to_save() is model
        assert cached.head_parameter_names() == {f"model.{n}" for n in head}
