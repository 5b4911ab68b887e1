"""Texts (and pairs) tokenised into a cached dataset, and their padded batches."""

from __future__ import annotations

from finetune.data import tokenizer_fingerprint


def tokenize_texts(table: dict, tokenizer, max_length: int):
    """A `datasets.Dataset` of token ids and labels (unpadded: batches are padded to their own longest row).

    The result is cached by `datasets` under a fingerprint of texts, labels, tokenizer and max_length, so a rerun
    (or another process of a multi-process run) reads it instead of tokenising again.
    """
    import datasets
    from datasets.fingerprint import Hasher

    from finetune.caches import token_cache_dir
    from finetune.progress import datasets_bars

    datasets_bars()
    pairs = table.get("text_pair")
    parts = [table["text"], table["label"], tokenizer_fingerprint(tokenizer), max_length]
    parts += [pairs] if pairs is not None else []
    fingerprint = Hasher.hash(parts)
    cache_dir = token_cache_dir()  # `finetune cache ls|clear` owns the path
    cache_dir.mkdir(parents=True, exist_ok=True)
    columns = {"text": table["text"], "label": table["label"], **({"text_pair": pairs} if pairs is not None else {})}
    dataset = datasets.Dataset.from_dict(columns)
    return dataset.map(
        # a pair is encoded as the tokenizer's pair; "longest_first" trims the longer text first, so both stay
        lambda batch: tokenizer(batch["text"], batch.get("text_pair"), truncation="longest_first",
                                max_length=max_length),
        batched=True,
        desc="tokenising",
        remove_columns=[name for name in columns if name != "label"],
        cache_file_name=str(cache_dir / f"{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
    )


def make_text_loader(dataset, tokenizer, batch_size: int, shuffle: bool, seed: int, sampler=None):
    """Batches padded to their own longest row; `sampler` (finetune.sampling) replaces the plain shuffle."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )
