"""The orders batches are drawn in, shared by the tasks whose rows are tokenised or decoded one by one: training
(length-grouped or class-balanced) and evaluation (longest first)."""

from __future__ import annotations


def longest_first(dataset) -> list[int]:
    """Evaluation order for text: rows sorted by length, so each batch pads to little more than its own rows
    (metrics do not depend on the order; features computed this way are put back in row order)."""
    from finetune.sampling import token_lengths

    lengths = token_lengths(dataset)
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def train_sampler(recipe, dataset, batch_size: int):
    """The training order when it is not a plain shuffle: length-grouped batches or class-balanced draws."""
    from finetune import sampling, transfer

    t = recipe.train
    if t.group_by_length:
        return sampling.LengthGroupedSampler(sampling.token_lengths(dataset), batch_size, t.seed)
    if t.sampler == "balanced":
        return sampling.ClassBalancedSampler(transfer.labels_of(dataset), t.seed)
    return None
