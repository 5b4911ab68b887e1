"""Heads: pooling of a backbone's token states and the linear or mlp head on top of them."""

from __future__ import annotations

import torch
from torch import nn


class ClassificationHead(nn.Module):
    """Dropout then linear, with optional hidden layers (dropout, linear, GELU) in front: an mlp head."""

    def __init__(self, in_features: int, num_outputs: int, hidden: list[int] = (), dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for next_width in hidden:
            layers += [nn.Dropout(dropout), nn.Linear(width, next_width), nn.GELU()]
            width = next_width
        self.hidden = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(width, num_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(self.hidden(features)))


def pool(outputs, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One vector per example: the backbone's own pooled output (auto), the first token (cls) or a masked mean."""
    states = outputs.last_hidden_state
    if pooling == "auto" and getattr(outputs, "pooler_output", None) is not None:
        return outputs.pooler_output
    if pooling == "mean":
        if attention_mask is None:
            return states.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return states[:, 0]
