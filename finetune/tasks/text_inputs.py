"""Text inputs, shared by the tasks that read texts (text and token classification): predict's strings, .txt files
and table columns (pairs from two), a row of logits per text or pair, the card's limit line and the ONNX usage."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.data import FILE_BUILDERS, IMAGE_EXTENSIONS, table_column
from finetune.errors import FinetuneError


def read_text_inputs(items: list[str], column: str, pair_column: str | None = None) -> list[tuple[str, object]]:
    """A .txt file gives one text per non-empty line, a csv/tsv/json/jsonl/parquet file its `column` (and
    `pair_column`: sentence pairs), anything else is a text."""
    expanded: list[tuple[str, object]] = []
    for item in items:
        path = Path(item).expanduser()
        is_file = path.is_file()
        suffix = path.suffix.lower() if is_file else ""
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            expanded += [(line, line) for line in lines if line.strip()]
        elif suffix in FILE_BUILDERS and pair_column is not None:  # sentence pairs: two columns
            expanded += _pairs(path, column, pair_column)
        elif suffix in FILE_BUILDERS:
            for i, text in enumerate(table_column(path, column, "--column")):
                words = isinstance(text, list) and text and all(isinstance(w, str) for w in text)
                if not words and (not isinstance(text, str) or not text.strip()):
                    raise FinetuneError(f"{path} row {i + 1}: empty text in column '{column}'")
                expanded.append((" ".join(text) if words else text, text))  # words: token classification
        elif path.is_dir() or (is_file and suffix in IMAGE_EXTENSIONS):
            # an existing image or folder: surely not meant as the words of its name
            kind = "a folder" if path.is_dir() else "an image file"
            raise FinetuneError(
                f"{item}: {kind}, but this is a text model; give texts, .txt files (one text per line) or "
                f"{'/'.join(ext.lstrip('.') for ext in FILE_BUILDERS)} files with a text column (--column)"
            )
        else:  # a text (a name that is no file or folder here is a text too)
            expanded.append((item, item))
    return expanded


def _pairs(path: Path, column: str, pair_column: str) -> list[tuple[str, dict]]:
    pairs = table_column(path, pair_column, "--pair-column")
    expanded = []
    for i, (text, pair) in enumerate(zip(table_column(path, column, "--column"), pairs)):
        for name, value in ((column, text), (pair_column, pair)):
            if not isinstance(value, str) or not value.strip():
                raise FinetuneError(f"{path} row {i + 1}: empty text in column '{name}'")
        expanded.append((f"{text} | {pair}", {"text": text, "text_pair": pair}))
    return expanded


def text_logits(predictor, texts: list, batch_size: int, show: bool) -> np.ndarray:
    """Logits of texts or sentence pairs ({"text", "text_pair"} or (text, pair)), longest first in batches."""
    from tqdm.auto import tqdm

    firsts, seconds = [], []
    for i, text in enumerate(texts):  # a text, or a sentence pair as {"text", "text_pair"} or (text, pair)
        if isinstance(text, dict) and isinstance(text.get("text"), str) and isinstance(text.get("text_pair"), str):
            text = (text["text"], text["text_pair"])
        pair = isinstance(text, tuple) and len(text) == 2 and all(isinstance(t, str) for t in text)
        if not (isinstance(text, str) or pair):
            raise FinetuneError(f"input {i + 1}: a text model takes strings or {{\"text\", \"text_pair\"}} pairs, "
                                f"got {type(text).__name__}")
        firsts.append(text[0] if pair else text)
        seconds.append(text[1] if pair else None)
    paired = any(second is not None for second in seconds)
    if paired and not all(second is not None for second in seconds):
        raise FinetuneError("inputs: give every input as a pair, or none (a batch is encoded one way)")
    # longest first: batches of similar length waste little on padding, and a too-long batch fails early
    size = [len(a) + len(b or "") for a, b in zip(firsts, seconds)]
    order = sorted(range(len(texts)), key=lambda i: -size[i])
    rows: list[np.ndarray] = [None] * len(texts)
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=not show):
        positions = order[start:start + batch_size]
        batch = predictor.preprocess(
            [firsts[i] for i in positions], [seconds[i] for i in positions] if paired else None,
            truncation="longest_first", max_length=predictor.max_length, padding=True, return_tensors="pt",
        )
        for i, row in zip(positions, predictor.forward(dict(batch))):
            rows[i] = row
    return np.stack(rows)


def text_input_limits(recipe) -> str:
    """The card's limit line for tokenised texts."""
    return (
        f"- Texts are cut to {recipe.data.max_length} tokens, as in training (the tokenizer's "
        "`model_max_length`): a long document is judged by its beginning."
    )


def onnx_text_usage(inputs: str, encode: str, decode: str) -> str:
    """The export card's lines for tokenised inputs: the exported tokenizer (the tokenizers library alone), the
    session, then `decode` (numpy on `logits`, `batch` and `inputs`)."""
    return f"""
import json, numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
info = json.load(open("export.json"))
tokenizer = Tokenizer.from_file("tokenizer.json")
tokenizer.enable_padding(); tokenizer.enable_truncation(info["max_length"] or 512)
session = ort.InferenceSession("model.onnx")
inputs = {inputs}
batch = tokenizer.encode_batch(inputs{encode})
feeds = {{"input_ids": [e.ids for e in batch], "attention_mask": [e.attention_mask for e in batch],
         "token_type_ids": [e.type_ids for e in batch]}}
logits = session.run(None, {{k: np.array(feeds[k], dtype=np.int64) for k in info["inputs"]}})[0]
{decode.strip()}
"""


def pipeline_runner(pipeline_task: str, folder: Path, words: bool = False, **options):
    """run(inputs, batch_size) through transformers.pipeline on a native model folder, as a user serves it without
    finetune; `words`: inputs are word lists, given to the pipeline as the sentence they spell."""
    from transformers import pipeline

    pipe = pipeline(pipeline_task, model=str(folder), device="cpu")

    def run(inputs: list, batch_size: int):
        return pipe([" ".join(item) for item in inputs] if words else list(inputs), batch_size=batch_size, **options)

    return run
