"""The fast CPU dropout: the same distribution as torch's dropout, gradients through the same mask, and attention
that equals transformers' sdpa wherever it does not drop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.dropout import FastDropout, dropout, sdpa_attention, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_drops_each_element_with_probability_p_and_is_unbiased(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = dropout(x, p)
    dropped = (y == 0).float()
    assert abs(dropped.mean().item() - p) < 0.004
    assert abs(y.mean().item() - 1.0) < 0.01 * (1 + p / (1 - p))
    # the four 16-bit slices of each 64-bit draw are each an independent Bernoulli(p)
    by_slice = dropped.view(-1, 4).mean(dim=0)
    assert torch.all((by_slice - p).abs() < 0.01), by_slice
    pairs = dropped.view(-1, 2)
    both = (pairs[:, 0] * pairs[:, 1]).mean().item()
    assert abs(both - p * p) < 0.006  # neighbours drop together no more often than chance says


def test_kept_values_and_gradients_are_scaled_by_the_same_mask():
    torch.manual_seed(1)
    x = torch.randn(37, 11, 5, requires_grad=True)
    y = dropout(x, 0.25)
    keep = y != 0
    scale = 1 / (1 - round(0.25 * 65536) / 65536)
    assert torch.allclose(y[keep], x[keep] * scale)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    assert torch.allclose(x.grad, torch.where(keep, weights * scale, 0.0))
    assert y.shape == x.shape


def test_gradcheck_with_a_fixed_mask():
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)

    def fixed(a):
        torch.manual_seed(3)
        return dropout(a, 0.3)

    assert torch.autograd.gradcheck(fixed, (x,))


def test_seeded_draws_repeat_and_unseeded_ones_differ():
    x = torch.ones(1000)
    torch.manual_seed(5)
    first = dropout(x, 0.5)
    second = dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.5), first)
    assert not torch.equal(first, second)


def test_identity_in_eval_mode_and_at_p_zero_and_torchs_dropout_at_p_one():
    x = torch.randn(10, 10)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.count_nonzero(dropout(x, 1.0)) == 0
    module = FastDropout(0.5).eval()
    assert torch.equal(module(x), x)


def test_use_fast_dropout_swaps_dropout_modules_and_keeps_their_rates(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    plain = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    count = use_fast_dropout(model)
    assert count == len(plain) > 0
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == plain
    assert all(type(m) is FastDropout for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.config._attn_implementation == "finetune_sdpa"


def test_fast_model_equals_the_plain_one_where_nothing_is_dropped(tiny_bert):
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(tiny_bert)
    fast = AutoModel.from_pretrained(tiny_bert)
    use_fast_dropout(fast)
    ids = torch.randint(5, 28, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    for m in (plain, fast):
        m.eval()
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=mask).last_hidden_state
        b = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b)  # evaluation goes to transformers' own sdpa


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_attention_math_path_equals_sdpa(mask_kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 16) for _ in range(3))
    keep = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    keep[1, :, :, 4:] = False
    keep[2, :, :, 1:] = False
    mask = {"bool": keep, "float": torch.zeros(3, 1, 7, 7).masked_fill(~keep, -1e9), "none": None}[mask_kind]
    encoder = nn.Module()
    encoder.is_causal = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else keep).transpose(1, 2)
    # a rate that rounds to no dropped element takes the training path without dropping anything
    out, weights = sdpa_attention(encoder, q, k, v, mask, dropout=1e-9, scaling=16 ** -0.5)
    assert weights is None
    assert torch.allclose(out, expected, atol=1e-6)


def test_attention_dropout_drops_probabilities_at_the_rate():
    torch.manual_seed(0)
    q, k = torch.zeros(64, 4, 32, 8), torch.zeros(64, 4, 32, 8)  # uniform attention: every probability 1/32
    v = torch.eye(32).expand(64, 4, 32, 32)  # the output row is the (dropped, rescaled) probability row itself
    encoder = nn.Module()
    encoder.is_causal = False
    out, _ = sdpa_attention(encoder, q, k, v, None, dropout=0.2)
    probs = out.transpose(1, 2)
    assert abs((probs == 0).float().mean().item() - 0.2) < 0.01
    assert torch.allclose(probs[probs != 0], torch.tensor(1 / 32 / (1 - round(0.2 * 65536) / 65536)))


def test_attention_training_step_reaches_every_weight(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    use_fast_dropout(model)
    model.train()
    ids = torch.randint(5, 28, (4, 6))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "pooler" in n or "layer." in n)


def _tiny_falcon():
    from transformers import FalconConfig, FalconForSequenceClassification

    return FalconForSequenceClassification(FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                        vocab_size=50, num_labels=2, pad_token_id=0))


def _tiny_gemma4():
    import transformers

    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip("this transformers has no Gemma 4")
    config = transformers.Gemma4TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=50,
                                           pad_token_id=0, layer_types=["full_attention"] * 2)
    config._attn_implementation = "sdpa"
    return transformers.Gemma4ForCausalLM(config)


@pytest.mark.parametrize("build", [_tiny_falcon, _tiny_gemma4], ids=["falcon", "gemma4"])
def test_models_whose_code_tests_for_sdpa_by_name_keep_their_attention(build):
    """Falcon's code branched on `_attn_implementation == "sdpa"` up to transformers 5.24, Gemma 4's still does: a
    model whose installed code does keeps transformers' sdpa by that name, any other takes the fast attention."""
    from finetune.dropout import _branches_on_sdpa

    model = build()
    assert model.config._attn_implementation == "sdpa"
    use_fast_dropout(model)
    assert model.config._attn_implementation == ("sdpa" if _branches_on_sdpa(model) else "finetune_sdpa")
    model.train()
    ids = torch.randint(1, 50, (2, 5))
    labels = torch.tensor([0, 1]) if "Classification" in type(model).__name__ else ids
    assert torch.isfinite(model(input_ids=ids, labels=labels).loss)


def test_an_installed_model_still_branches_on_sdpa_by_name_so_the_keeping_path_is_exercised(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from finetune.dropout import _branches_on_sdpa

    assert _branches_on_sdpa(_tiny_gemma4())
    assert not _branches_on_sdpa(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2))


def test_train_fast_dropout_false_trains_with_torchs_own_dropout(tiny_bert, tiny_data, tmp_path):
    """The switch changes the masks drawn (so the losses), and nothing else: without dropout both runs agree."""
    from conftest import recipe_dict, to_recipe

    from finetune.train import train

    def epoch_loss(name: str, fast: bool, dropout: float) -> float:
        dotted = {"train.epochs": 1, "train.log_with": [], "train.fast_dropout": fast, "backbone.dropout": dropout}
        metrics = train(to_recipe(recipe_dict(tiny_bert, tiny_data, tmp_path / name, **dotted)))
        return metrics["epochs"][0]["loss"]

    assert epoch_loss("fast", True, 0.3) != epoch_loss("torch", False, 0.3)
    assert epoch_loss("fast-0", True, 0.0) == pytest.approx(epoch_loss("torch-0", False, 0.0), abs=1e-6)
