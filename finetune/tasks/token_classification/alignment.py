"""Word tags onto sub-tokens: the fast tokenizer's word ids, the aligned labels, the cached dataset and its loader."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from finetune.errors import FinetuneError
from finetune.tasks.token_classification.tags import IGNORE_INDEX


def require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise FinetuneError(
            f"token classification needs a fast tokenizer (tokenizer.json) to map sub-tokens to words; "
            f"{type(tokenizer).__name__} is not one"
        )


def continuation_tags(names: list[str]) -> list[int]:
    """For each tag id, the id its word's later sub-tokens take under label_all_tokens: B-X becomes I-X where the tag
    set has I-X (as run_ner.py's b_to_i_label); every other tag stays itself."""
    index = {name: i for i, name in enumerate(names)}
    return [index.get("I-" + name[2:], i) if name.startswith("B-") else i for i, name in enumerate(names)]


def align_labels(word_ids: Sequence[int | None], word_tags: Sequence[int], label_all_tokens: bool = False,
                 continuation: Sequence[int] | None = None) -> list[int]:
    """One sentence's word tag ids onto its sub-tokens: a word's tag on its first sub-token, -100 on special tokens
    and (unless label_all_tokens, then the continuation tag) on the word's other sub-tokens."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous:
            labels.append(word_tags[word])
        elif label_all_tokens:
            tag = word_tags[word]
            labels.append(continuation[tag] if continuation is not None else tag)
        else:
            labels.append(IGNORE_INDEX)
        previous = word
    return labels


def aligner(tokenizer, max_length: int, names: list[str], label_all_tokens: bool = False,
            words_key: str = "tokens", tags_key: str = "label") -> Callable[[dict], dict]:
    """A batched function for `datasets.Dataset.map`: words (`words_key`) and tag ids (`tags_key`) to input_ids,
    attention_mask (token_type_ids where the tokenizer makes them) and `labels`, truncated at max_length."""
    require_fast(tokenizer)
    continuation = continuation_tags(names)

    def tokenize_and_align(batch: dict) -> dict:
        encoded = tokenizer(batch[words_key], is_split_into_words=True, truncation=True, max_length=max_length)
        encoded["labels"] = [
            align_labels(encoded.word_ids(i), tags, label_all_tokens, continuation)
            for i, tags in enumerate(batch[tags_key])
        ]
        return encoded

    return tokenize_and_align


def tokenize(table: dict, tokenizer, max_length: int, names: list[str], label_all_tokens: bool = False):
    """A `datasets.Dataset` of token ids and aligned labels from {"tokens": word lists, "label": tag id lists}
    (unpadded; cached by `datasets` under a fingerprint of the inputs, as `finetune.data.tokenize` is)."""
    import datasets
    from datasets.fingerprint import Hasher

    from finetune.progress import datasets_bars

    datasets_bars()
    from finetune.data import tokenizer_fingerprint

    fingerprint = Hasher.hash([table["tokens"], table["label"], tokenizer_fingerprint(tokenizer), max_length, names,
                               label_all_tokens])
    from finetune.caches import token_cache_dir

    cache_dir = token_cache_dir()  # beside the texts' (fingerprints differ): `finetune cache clear tokens` clears both
    cache_dir.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_dict({"tokens": table["tokens"], "label": table["label"]})
    return dataset.map(
        aligner(tokenizer, max_length, names, label_all_tokens),
        batched=True,
        desc="tokenising",
        remove_columns=["tokens", "label"],
        cache_file_name=str(cache_dir / f"{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
    )


def collator(tokenizer):
    """Pads a batch to its longest row: inputs with the tokenizer's pad id, labels with -100."""
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)


def make_loader(dataset, tokenizer, batch_size: int, shuffle: bool, seed: int, sampler=None):
    """`finetune.data.make_loader` with the token collator (padded labels)."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator, collate_fn=collator(tokenizer))


def word_logits(predictor, sentences: list, batch_size: int = 64) -> list:
    """A tagger's (a Predictor's) logits for each word of each sentence, read on the word's first sub-token of its
    own tokenizer (distillation: a teacher with another tokenizer still gives one row per word); (words, tags) per
    sentence, fewer words where its max_length cuts the sentence."""
    import numpy as np

    rows = []
    for start in range(0, len(sentences), batch_size):
        words = [list(sentence) for sentence in sentences[start:start + batch_size]]
        encoded = predictor.preprocess(words, is_split_into_words=True, truncation=True,
                                       max_length=predictor.max_length, padding=True, return_tensors="pt")
        logits = predictor.forward(dict(encoded))
        for i in range(len(words)):
            first: dict[int, int] = {}
            for position, word in enumerate(encoded.word_ids(i)):
                if word is not None:
                    first.setdefault(word, position)
            rows.append(np.asarray(logits[i, [first[w] for w in sorted(first)]], dtype=np.float32))
    return rows
