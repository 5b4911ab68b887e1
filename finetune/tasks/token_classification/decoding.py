"""Decoding for predict/serve: texts or word lists encoded, logits to word tags and entities with character spans."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from finetune.errors import FinetuneError
from finetune.tasks.token_classification.alignment import require_fast
from finetune.tasks.token_classification.tags import OUTSIDE, PREFIXED

AGGREGATIONS = ("first", "simple")


def split_words(text: str, tokenizer) -> list[tuple[int, int]]:
    """(start, end) of each word of a raw text as the tokenizer splits it: its pre-tokenizer (whitespace and
    punctuation for BERT) run on its normalised text, so a CJK character is a word where BERT's normaliser makes it
    one and characters it drops (a zero-width space) belong to no word; a marker a pre-tokenizer folds into a word
    (RoBERTa's space) is trimmed, so that every span is the word's own characters of `text`."""
    require_fast(tokenizer)
    encoding = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False,
                         return_attention_mask=False, return_token_type_ids=False)
    spans = []
    for word in sorted({w for w in encoding.word_ids() if w is not None}):
        chars = encoding.word_to_chars(word)
        piece = text[chars.start:chars.end]
        start, end = chars.start + len(piece) - len(piece.lstrip()), chars.end - len(piece) + len(piece.rstrip())
        if end > start:
            spans.append((start, end))
    return spans


def join_words(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Pre-split words as one text, joined by single spaces (what spans index into), and each word's span."""
    spans, position = [], 0
    for word in words:
        spans.append((position, position + len(word)))
        position += len(word) + 1
    return " ".join(words), spans


@dataclass
class EncodedInputs:
    """Sentences ready for the model, with what decoding needs to map sub-tokens back to characters."""

    texts: list[str]  # a raw input itself; pre-split words joined by single spaces
    word_spans: list[list[tuple[int, int]]]  # each word's (start, end) in its text
    encoding: Any  # the tokenizer's BatchEncoding: padded tensors, offsets relative to each word, word_ids(i)

    def model_inputs(self) -> dict:
        """The tensors the model takes (the encoding without its offsets)."""
        return {key: value for key, value in self.encoding.items() if key != "offset_mapping"}

    @property
    def words(self) -> list[list[str]]:
        return [[text[s:e] for s, e in spans] for text, spans in zip(self.texts, self.word_spans)]


def encode_inputs(inputs: Sequence[str | Sequence[str]], tokenizer, max_length: int | None) -> EncodedInputs:
    """Raw texts (split as the pre-tokenizer splits them) or lists of words, tokenised as words, padded, truncated."""
    require_fast(tokenizer)
    texts, spans, words = [], [], []
    for n, item in enumerate(inputs):
        if isinstance(item, str):
            item_spans = split_words(item, tokenizer)
            texts.append(item)
            words.append([item[s:e] for s, e in item_spans])
            spans.append(item_spans)
        elif isinstance(item, (list, tuple)) and all(isinstance(w, str) for w in item):
            text, item_spans = join_words(item)
            texts.append(text)
            words.append(list(item))
            spans.append(item_spans)
        else:
            raise FinetuneError(f"input {n + 1}: a token classifier takes a text or a list of words (strings), "
                                f"got {type(item).__name__}")
    # an input with no words still gets its special tokens, and so an empty prediction
    encoding = tokenizer(words, is_split_into_words=True, truncation=max_length is not None, max_length=max_length,
                         padding=True, return_offsets_mapping=True, return_tensors="pt")
    return EncodedInputs(texts, spans, encoding)


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def decode(logits: np.ndarray, encoded: EncodedInputs, names: list[str], aggregation: str = "first") -> list[dict]:
    """Per input {"words", "tags", "scores", "entities"} from per-sub-token logits [inputs, sub-tokens, tags].

    tags/scores: each word's tag and its probability, read on the word's first sub-token (as training labels it);
    None for a word past the max_length cut. entities: [{"word", "label", "start", "end", "score"}], "label" the type
    without B-/I-, start/end character offsets into the input (pre-split words: into the words joined by single
    spaces), "word" that slice of it, "score" the mean probability of the grouped parts. aggregation "first" groups
    the word tags (pipeline aggregation_strategy="first"); "simple" groups every sub-token's own argmax, as
    `pipeline("token-classification", aggregation_strategy="simple")` does, so a word can be split between entities.
    Grouping as the pipeline's: B-X opens an entity, I-X (or a plain tag X) continues one of type X; for BIOES and
    BILOU, S-/U- is a whole entity and E-/L- closes one.
    """
    if aggregation not in AGGREGATIONS:
        raise FinetuneError(f"aggregation '{aggregation}' is not one of {', '.join(AGGREGATIONS)}")
    probabilities = _softmax(logits)
    results = []
    for n, (text, spans) in enumerate(zip(encoded.texts, encoded.word_spans)):
        word_ids = encoded.encoding.word_ids(n)
        offsets = encoded.encoding["offset_mapping"][n].tolist()
        tags: list[str | None] = [None] * len(spans)
        scores: list[float | None] = [None] * len(spans)
        parts = []  # (tag id, score, start, end) of each word ("first") or sub-token ("simple")
        for position, word in enumerate(word_ids):
            if word is None:
                continue
            start = spans[word][0] + offsets[position][0]
            end = spans[word][0] + offsets[position][1]
            row = probabilities[n, position]
            best = int(row.argmax())
            if tags[word] is None:
                tags[word], scores[word] = names[best], float(row[best])
                if aggregation == "first":
                    parts.append([best, float(row[best]), start, end])
            if aggregation == "simple":
                parts.append([best, float(row[best]), start, end])
            if aggregation == "first":
                parts[-1][3] = end  # the word runs to its last kept sub-token
        entities = [
            {"word": text[start:end], "label": label, "start": start, "end": end, "score": score}
            for label, start, end, score in _group(parts, names)
        ]
        words = [text[s:e] for s, e in spans]
        results.append({"words": words, "tags": tags, "scores": scores, "entities": entities})
    return results


def _group(parts: list[list], names: list[str]) -> list[tuple[str, int, int, float]]:
    """(type, start, end, mean score) of adjacent parts that form one entity; 'O' parts are no entity."""
    groups: list[list] = []  # [type, parts, closed]
    for tag_id, score, start, end in parts:
        name = names[tag_id]
        match = PREFIXED.match(name)
        prefix, kind = (match.group(1), match.group(2)) if match else ("I", name)
        last = groups[-1] if groups else None
        continues = (last is not None and not last[2] and last[0] == kind and prefix in "IEL" and name != OUTSIDE)
        if continues:
            last[1].append((score, start, end))
        else:
            groups.append([kind, [(score, start, end)], False])
        if prefix in "SUEL":
            groups[-1][2] = True  # a single or closing tag ends its entity
    entities = []
    for kind, members, _ in groups:
        if kind == OUTSIDE:
            continue
        entities.append((kind, members[0][1], members[-1][2], float(np.mean([m[0] for m in members]))))
    return entities


def predict(model, tokenizer, inputs: Sequence[str | Sequence[str]], names: list[str], max_length: int | None,
            aggregation: str = "first", batch_size: int = 32, device: str | None = None, forward=None) -> list[dict]:
    """`decode` over a model's logits for raw texts or word lists, batched (what predict/serve print per input).
    forward: a function of the encoded batch giving numpy logits in place of `model` (an ONNX session's)."""
    if forward is None:
        forward = torch_forward(model, device)
    results = []
    for start in range(0, len(inputs), batch_size):
        encoded = encode_inputs(inputs[start:start + batch_size], tokenizer, max_length)
        results.extend(decode(forward(encoded.model_inputs()), encoded, names, aggregation))
    return results


def torch_forward(model, device=None):
    """The torch model as a function of a batch of tensors giving numpy logits [inputs, sub-tokens, tags]."""
    import torch

    device = device or next(model.parameters()).device

    def forward(batch: dict) -> np.ndarray:
        with torch.inference_mode():
            output = model(**{k: v.to(device) for k, v in batch.items()})
        logits = output.logits if hasattr(output, "logits") else output
        return logits.float().cpu().numpy()

    return forward
