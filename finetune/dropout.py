"""Dropout whose masks are cheap to draw on a CPU, in nn.Dropout modules and in transformers' attention.

torch draws a CPU dropout mask with one call of its (serial) Mersenne Twister per element and a float compare; on
MiniLM at 64 tokens that is 12% of a fine-tuning step and ~40% of its forward pass. The same Bernoulli mask can be
read off 16-bit slices of full-range 64-bit draws: four elements per draw pair, and one integer compare. The drop
probability is p rounded to a multiple of 1/65536 (0.1 becomes 0.100006) and the kept values are scaled by the
exact inverse of the keep probability, so the output is unbiased as torch's is. Draws come from torch's default
generator: seeding, checkpointed RNG state and exact resume work as before; only the stream differs from torch's.
Elsewhere (GPUs, where torch's Philox kernel is fast) and in eval mode this is torch's own dropout.

Attention dropout sits inside scaled_dot_product_attention, which on a CPU then leaves its fused kernel for a math
path with torch's slow mask (MiniLM: 27 instead of 16 ms per layer, forward and backward). A transformers attention
function registered as "finetune_sdpa" does that math path with the fast mask while training, and is transformers'
own sdpa everywhere else (evaluation, no dropout, causal, GQA or biased attention, GPUs). It is a runtime choice:
saved configs do not record it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_STEPS = 1 << 16


def _keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask of `shape` (each element dropped with probability ~p) and 1 / P(keep)."""
    n = math.prod(shape)
    dropped = round(p * _STEPS)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
    keep = bits.view(torch.int16)[:n].view(shape) >= dropped - _STEPS // 2
    return keep, _STEPS / (_STEPS - dropped)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)` with a fast mask on CPU tensors."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not x.is_floating_point() or p >= 1.0:
        return F.dropout(x, p, training)
    keep, scale = _keep_mask(x.shape, p)
    return _Masked.apply(x, keep, scale)


class _Masked(torch.autograd.Function):
    """x * keep * scale, keeping only the 1-byte mask for backward (as torch's dropout does); one pass each way."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0.0)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0), None, None


_dropout = dropout  # for sdpa_attention, whose `dropout` is a rate as in transformers' signature


class FastDropout(nn.Dropout):
    """nn.Dropout with the fast CPU mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)


ATTENTION = "finetune_sdpa"


def sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                   **kwargs):
    """transformers' sdpa attention, with the attention dropout of CPU training done by `dropout()` above."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (
        not dropout
        or query.device.type != "cpu"
        or (causal and attention_mask is None and query.shape[2] > 1)
        or query.shape[1] != key.shape[1]
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = _dropout(scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, sdpa_attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_fast_dropout(model: nn.Module) -> int:
    """Turn the model's nn.Dropout modules into FastDropout in place (same p, no state), and its transformers
    models' sdpa attention into `sdpa_attention`; returns how many dropout modules changed."""
    from transformers import PreTrainedModel

    count = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = FastDropout
            count += 1
        elif isinstance(module, PreTrainedModel) and module.config._attn_implementation == "sdpa" and not (
            _branches_on_sdpa(module)
        ):
            _register_attention()
            module.set_attn_implementation(ATTENTION)
    return count


def _branches_on_sdpa(model) -> bool:
    """Whether the model's code tests for "sdpa" by name (Falcon, Gemma 4, ...): renamed, it would take other paths."""
    import inspect
    import sys

    try:
        source = inspect.getsource(sys.modules[type(model).__module__])
    except (OSError, TypeError, KeyError):
        return True
    return '_attn_implementation == "sdpa"' in source or "_attn_implementation != \"sdpa\"" in source
