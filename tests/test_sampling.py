"""Samplers: length-grouped batches (seeded, every index once, less padding, sharded by accelerate) and
class-balanced draws."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from finetune.sampling import ClassBalancedSampler, LengthGroupedSampler, token_lengths


def skewed_lengths(n: int = 1000, seed: int = 0) -> list[int]:
    """Mostly short texts and a long tail, as real text sets are: random batches pad nearly all rows to the tail."""
    rng = random.Random(seed)
    return [min(256, int(rng.lognormvariate(3.0, 0.8)) + 2) for _ in range(n)]


def batches_of(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


def test_same_seed_same_order_and_a_new_order_each_epoch():
    lengths = skewed_lengths(300)
    a = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    b = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    second = list(a)
    assert second != first_a  # the next epoch reshuffles
    b.set_epoch(1)  # as accelerate does, and as a resumed run does
    assert list(b) == second
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=4)) != first_a


@pytest.mark.parametrize("n, batch_size", [(1000, 32), (1001, 32), (37, 8), (5, 8)])
def test_every_index_exactly_once_per_epoch(n, batch_size):
    sampler = LengthGroupedSampler(skewed_lengths(n), batch_size=batch_size, seed=0)
    for _ in range(2):
        order = list(sampler)
        assert sorted(order) == list(range(n))
        assert len(sampler) == n


def test_short_last_batch_stays_last_and_longest_batch_first():
    lengths = skewed_lengths(1001)
    order = list(LengthGroupedSampler(lengths, batch_size=32, seed=0))
    batches = batches_of(order, 32)
    assert [len(b) for b in batches[:-1]] == [32] * 31 and len(batches[-1]) == 1001 - 31 * 32
    assert max(lengths) == lengths[batches[0][0]]


def test_padding_reduced_against_random_batches():
    lengths = skewed_lengths(2000)
    grouped = batches_of(list(LengthGroupedSampler(lengths, batch_size=32, seed=0)), 32)
    shuffled = batches_of(torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist(), 32)
    real = sum(lengths)
    grouped_waste = padded_tokens(lengths, grouped) - real
    random_waste = padded_tokens(lengths, shuffled) - real
    assert grouped_waste < random_waste / 4, (grouped_waste, random_waste)


def test_batches_are_not_in_sorted_length_order():
    """Shuffled buckets, not a sorted order: the batches' lengths do not trend down through the epoch."""
    lengths = skewed_lengths(4000)
    batches = batches_of(list(LengthGroupedSampler(lengths, batch_size=16, seed=0)), 16)[1:-1]
    longest = [max(lengths[i] for i in batch) for batch in batches]
    falls = sum(a > b for a, b in zip(longest, longest[1:]))
    rises = sum(a < b for a, b in zip(longest, longest[1:]))
    assert rises > len(longest) / 4 and falls > len(longest) / 4, (rises, falls)


def test_a_dataloader_cuts_the_grouped_batches():
    lengths = skewed_lengths(200)
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=1)
    expected = batches_of(list(LengthGroupedSampler(lengths, batch_size=16, seed=1)), 16)
    loader = DataLoader(list(range(200)), batch_size=16, sampler=sampler)
    assert [batch.tolist() for batch in loader] == expected


def test_accelerate_shards_the_same_order_across_processes():
    """accelerate's prepare() deals the global batches out to the processes: together they see every index once,
    each batch is one of the single-process grouped batches, and set_epoch (called by the prepared loader) picks the
    epoch's order on every process alike."""
    from accelerate.data_loader import prepare_data_loader

    lengths = skewed_lengths(256)
    reference = LengthGroupedSampler(lengths, batch_size=8, seed=2)
    per_epoch = [batches_of(list(reference), 8) for _ in range(2)]
    shards = []
    for rank in range(2):
        loader = DataLoader(list(range(256)), batch_size=8,
                            sampler=LengthGroupedSampler(lengths, batch_size=8, seed=2))
        shards.append(prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False))
    for epoch in range(2):
        seen = [[batch.tolist() for batch in shard] for shard in shards]
        assert seen[0] == per_epoch[epoch][0::2] and seen[1] == per_epoch[epoch][1::2]
        assert sorted(i for batches in seen for batch in batches for i in batch) == list(range(256))


def test_balanced_sampler_draws_classes_roughly_uniformly():
    labels = ["common"] * 1000 + ["rare"] * 100  # 10:1
    sampler = ClassBalancedSampler(labels, seed=0)
    drawn = Counter(labels[i] for i in sampler)
    assert sum(drawn.values()) == len(labels) == len(sampler)
    assert abs(drawn["rare"] / len(labels) - 0.5) < 0.05, drawn
    assert len({i for i in sampler if labels[i] == "rare"}) > 90  # nearly every rare row shows up


def test_balanced_sampler_is_seeded_and_draws_anew_each_epoch():
    labels = [0] * 50 + [1] * 5 + [2] * 20
    a, b = ClassBalancedSampler(labels, seed=7), ClassBalancedSampler(labels, seed=7)
    first = list(a)
    assert first == list(b)
    assert list(a) != first
    b.set_epoch(0)
    assert list(b) == first
    assert list(ClassBalancedSampler(labels, seed=8)) != first
    assert len(list(ClassBalancedSampler(labels, seed=0, num_samples=30))) == 30


def test_token_lengths_of_a_tokenized_dataset(tiny_bert):
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    dataset = datasets.Dataset.from_dict({"text": ["bread", "the goal of the match"], "label": [0, 1]})
    dataset = dataset.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    assert token_lengths(dataset) == [3, 7]  # [CLS] ... [SEP]
