"""Text inputs of `finetune serve`: a text or a sentence pair per JSON input."""

from __future__ import annotations

from finetune.errors import FinetuneError


def parse_text_input(value, i: int):
    """One /predict input: a text, or a sentence pair {"text", "text_pair"}."""
    if isinstance(value, dict):  # a sentence pair
        if set(value) != {"text", "text_pair"}:
            raise FinetuneError(f"inputs[{i}]: a pair is {{\"text\": ..., \"text_pair\": ...}}, got keys "
                                f"{', '.join(sorted(map(str, value))) or 'none'}")
        for key in ("text", "text_pair"):
            if not isinstance(value[key], str) or not value[key].strip():
                raise FinetuneError(f"inputs[{i}].{key}: must be a non-empty string")
        return f"{value['text']} | {value['text_pair']}", {"text": value["text"], "text_pair": value["text_pair"]}
    if not isinstance(value, str):
        raise FinetuneError(f"inputs[{i}]: a text model takes strings or {{\"text\", \"text_pair\"}} objects, "
                            f"got {type(value).__name__}")
    if not value.strip():
        raise FinetuneError(f"inputs[{i}]: empty text")
    return value, value
