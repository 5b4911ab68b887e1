"""Explanations shown: words tinted at a terminal, JSON Lines, and `explain.html` (words highlighted, image overlays
inline, one self-contained file), with an overlay PNG per image."""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from pathlib import Path

import numpy as np

POSITIVE = (220, 50, 47)  # red: the word raises the label's score
NEGATIVE = (38, 139, 210)  # blue: it lowers it


def tint(value: float, peak: float) -> tuple[int, int, int]:
    """The background of a word: white blended towards red (for) or blue (against) by |value| / peak."""
    strength = min(1.0, abs(value) / peak) if peak > 0 else 0.0
    colour = POSITIVE if value >= 0 else NEGATIVE
    return tuple(round(255 + (c - 255) * strength) for c in colour)


def word_lists(result: dict) -> list[tuple[str, dict, list[dict]]]:
    """(heading, the labelled object, its words) for each word list in one result: the text (and its pair), or each
    entity's."""
    lists = [(heading, result, result[key]) for heading, key in (("", "words"), ("pair", "pair_words"))
             if result.get(key) is not None]
    for entity in result.get("entities", []):
        lists.append((f"{entity['word']} [{entity['start']}:{entity['end']}]", entity, entity["words"]))
    return lists


def peak_of(words: list[dict]) -> float:
    return max((abs(w["attribution"]) for w in words), default=0.0)


def terminal_words(words: list[dict], coloured: bool) -> str:
    if not coloured:
        return " ".join(f"{w['word']}({w['attribution']:+.3f})" for w in words)
    peak = peak_of(words)
    return " ".join("\x1b[48;2;{};{};{}m\x1b[30m{}\x1b[0m".format(*tint(w["attribution"], peak), w["word"])
                    for w in words)


def print_explanations(shown: list[str], results: list[dict], as_json: bool) -> None:
    """JSON Lines with --json; else per input its label and score, then its words (tinted at a terminal)."""
    if as_json:
        for result in results:
            print(json.dumps(result))
        return
    coloured = sys.stdout.isatty()
    for text, result in zip(shown, results):
        if "label" in result:
            print(f"{result['label']} {result['score']:.3f}  {text}")
        else:
            print(text)
        for heading, labelled, words in word_lists(result):
            head = f"  {heading} -> {labelled['label']} {labelled['score']:.3f}: " if heading else "  "
            print(head + terminal_words(words, coloured))
        if "heatmap" in result:
            heat = np.asarray(result["heatmap"])
            row, column = np.unravel_index(int(heat.argmax()), heat.shape)
            print(f"  heatmap {heat.shape[0]}x{heat.shape[1]}, strongest at row {row}, column {column}")


def overlay_png(picture: np.ndarray, heatmap: np.ndarray) -> bytes:
    """The image the model saw with the heatmap (positive part, scaled to its peak) blended over it in a colour
    map."""
    from matplotlib import colormaps
    from PIL import Image

    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    heat = heat / heat.max() if heat.max() > 0 else heat
    colours = colormaps["jet"](heat)[..., :3] * 255
    blended = (0.55 * picture.astype(np.float64) + 0.45 * colours).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blended).save(buffer, format="PNG")
    return buffer.getvalue()


def html_words(words: list[dict]) -> str:
    peak = peak_of(words)
    spans = []
    for w in words:
        r, g, b = tint(w["attribution"], peak)
        spans.append(f'<span class="w" style="background-color: rgb({r}, {g}, {b})" '
                     f'title="{w["attribution"]:+.4f}">{html.escape(w["word"])}</span>')
    return " ".join(spans)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>finetune explain</title><style>
body {{ font: 15px/1.7 system-ui, sans-serif; margin: 2em; max-width: 60em; }}
.input {{ border-bottom: 1px solid #ddd; padding: 0.8em 0; }} .label {{ font-weight: 600; }}
.w {{ padding: 0.1em 0.2em; border-radius: 3px; }} .note {{ color: #666; font-size: 90%; }}
img {{ image-rendering: pixelated; width: 16em; }}
</style></head><body>
<h1>finetune explain</h1>
<p class="note">{method}; red words raise the explained label's score, blue ones lower it (hover: the attribution).</p>
{items}
</body></html>
"""


def write_page(folder: Path, shown: list[str], results: list[dict], subjects: list, method: str) -> Path:
    """explain.html in `folder` (and image-N.png, the overlay of each image input)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for n, (text, result, subject) in enumerate(zip(shown, results, subjects), 1):
        parts = [f'<div class="input"><div class="note">{html.escape(text)}</div>']
        if "label" in result:
            parts.append(f'<div class="label">{html.escape(str(result["label"]))} {result["score"]:.3f}</div>')
        for heading, labelled, words in word_lists(result):
            if heading:
                parts.append(f'<div class="label">{html.escape(heading)}: {html.escape(labelled["label"])} '
                             f'{labelled["score"]:.3f}</div>')
            parts.append(f'<p class="words">{html_words(words)}</p>')
        if "heatmap" in result and subject.picture is not None:
            png = overlay_png(subject.picture, np.asarray(result["heatmap"]))
            (folder / f"image-{n}.png").write_bytes(png)
            parts.append(f'<img alt="overlay" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
        items.append("\n".join(parts) + "</div>")
    page = folder / "explain.html"
    page.write_text(PAGE.format(method=html.escape(method), items="\n".join(items)), encoding="utf-8")
    return page
