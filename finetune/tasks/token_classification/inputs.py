"""Token-classification inputs for predict and serve: CoNLL files' sentences as word lists, raw texts, and serve's
texts or lists of words."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError
from finetune.tasks.text_inputs import read_text_inputs
from finetune.tasks.token_classification.conll import CONLL_SUFFIXES, read_conll


def read_token_inputs(items: list[str], column: str, pair_column: str | None = None) -> list[tuple[str, object]]:
    """A CoNLL file's sentences as word lists (its tags are not needed); anything else as a text model reads it
    (.txt: one raw text per line, tables: a column of texts or word lists)."""
    expanded: list[tuple[str, object]] = []
    for item in items:
        path = Path(item).expanduser()
        suffix = path.suffix.lower()
        if path.is_file() and suffix in CONLL_SUFFIXES and suffix != ".txt":
            expanded += [(" ".join(words), words) for words in read_conll(path, f"'{path}'").texts]
        else:
            expanded += read_text_inputs([item], column, pair_column)
    return expanded


def parse_words_input(value, i: int):
    """One /predict input: a raw text, or a list of words (one tag each)."""
    if isinstance(value, list):
        if not value:
            raise FinetuneError(f"inputs[{i}]: an empty list of words")
        for j, word in enumerate(value):
            if not isinstance(word, str) or not word.strip():
                raise FinetuneError(f"inputs[{i}][{j}]: a word must be a non-empty string")
        return " ".join(value), list(value)
    if not isinstance(value, str):
        raise FinetuneError(f"inputs[{i}]: a token classifier takes a text or a list of words, got "
                            f"{type(value).__name__}")
    if not value.strip():
        raise FinetuneError(f"inputs[{i}]: empty text")
    return value, value
