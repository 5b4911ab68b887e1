"""The page at `/` in a real headless Chromium: a text typed into it comes back as the model's label and top labels;
behind --api-key-env the page asks for the key once and sends it, and a pair model's page sends both texts.

Drives Debian's `chromium` over the DevTools protocol (a websocket, with the `websockets` package uvicorn[standard]
brings): focus the text box, type with Input.insertText, click predict, read the label the page shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from browser import Page, needs_chromium, open_page, wait_for
from conftest import recipe_dict, subprocess_env, to_recipe, write_csv
from test_serve import KEY, free_port

pytestmark = needs_chromium


@contextmanager
def serving(source: Path, *options: str, **env):
    """`finetune serve source` on a loopback port until the block ends; yields its url."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(source), "--port", str(port), *options],
                               env=subprocess_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: urllib.request.urlopen(url + "/health", timeout=1).status == 200, 90, "finetune serve")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tiny_bert, tmp_path_factory):
    """A tiny transformers model folder (untrained head, three labels) behind a real `finetune serve` on a
    loopback port; yields (url, model folder)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("page") / "model"
    torch.manual_seed(0)
    labels = ["food", "sport", "tech"]
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=3, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    with serving(folder) as url:
        yield url, folder


@pytest.fixture(scope="module")
def pair_served(tiny_bert, tmp_path_factory):
    """A tiny run trained one epoch on sentence pairs behind `finetune serve --api-key-env`; yields (url, run)."""
    from test_pairs import pair_rows

    from finetune.train import train

    root = tmp_path_factory.mktemp("page-pairs")
    header = ["premise", "hypothesis", "relation"]
    data = {key: write_csv(root / f"{key}.csv", header, pair_rows(count, seed))
            for seed, (key, count) in enumerate((("train", 24), ("validation", 9), ("test", 9)))}
    train(to_recipe(recipe_dict(tiny_bert, data, root / "run", **{
        "data.text_column": "premise", "data.text_pair_column": "hypothesis", "data.label_column": "relation",
        "train.epochs": 1})))
    with serving(root / "run", "--api-key-env", "PAGE_KEY", PAGE_KEY=KEY) as url:
        yield url, root / "run"


class ServePage(Page):
    """The serve page's own reading: its table of top labels."""

    def top_labels(self) -> list:
        return self.js("[...document.querySelectorAll('#top tr')].map(r => [r.cells[0].textContent, "
                       "Number(r.cells[1].textContent)])")


def open_served_page(url: str, profile: Path):
    return open_page(url + "/", profile, page_class=ServePage)


def test_a_text_typed_into_the_page_returns_the_models_label(served, tmp_path):
    import finetune

    url, run = served
    text = "the bread and the soup today"
    expected = finetune.load(run).predict(text)
    with open_served_page(url, tmp_path / "profile") as page:
        wait_for(lambda: page.text("info"), 30, "/info on the page")
        assert "text-classification" in page.text("info")
        assert not page.shown("key-form") and not page.shown("text-pair")  # no key, no pairs: not asked
        page.type("text", text)
        page.click("go")
        shown = wait_for(lambda: page.text("label"), 30, "the label")
        assert shown == expected["label"]
        answer = json.loads(page.text("out"))
        assert answer["predictions"][0]["input"] == text and len(answer["predictions"][0]["scores"]) == 3
        top = page.top_labels()  # the three labels, best first, with their scores
        assert [label for label, _ in top] == [s["label"] for s in expected["scores"]]
        assert all(abs(score - s["score"]) < 1e-3 for (_, score), s in zip(top, expected["scores"]))
        page.click("why-go")  # the words, tinted by their Integrated Gradients attributions
        words = wait_for(lambda: page.js("[...document.querySelectorAll('#why span')].map(s => "
                                         "[s.textContent, s.style.backgroundColor, Number(s.title)])"), 60, "the words")
        assert [word for word, _, _ in words] == text.split()
        strongest = max(words, key=lambda w: abs(w[2]))
        assert strongest[1].startswith("rgb(") and strongest[1] != "rgba(0, 0, 0, 0)"  # full colour for the strongest
        assert all(colour.startswith("rgb") for _, colour, _ in words)


def test_with_a_key_the_page_asks_for_it_once_and_a_pair_model_gets_both_texts(pair_served, tmp_path):
    import finetune

    url, run = pair_served
    first, second = "the bread", "a goal"
    expected = finetune.load(run).predict({"text": first, "text_pair": second})
    with open_served_page(url, tmp_path / "profile") as page:
        wait_for(lambda: page.shown("key-form"), 30, "the page to ask for the key")
        assert not page.shown("main")
        page.type("key", "not-the-key")
        page.click("key-go")
        refused = wait_for(lambda: page.text("message"), 30, "the refusal")
        assert "refused this key" in refused and page.shown("key-form") and not page.shown("main")
        page.type("key", KEY)
        page.click("key-go")
        wait_for(lambda: page.shown("main") and page.text("info"), 30, "/info with the key")
        assert page.text("message") == "" and not page.shown("key-form") and page.shown("text-pair")
        page.type("text", first)
        page.type("text-pair", second)
        page.click("go")
        assert wait_for(lambda: page.text("label"), 30, "the label") == expected["label"]
        answer = json.loads(page.text("out"))
        assert answer["predictions"][0]["input"] == f"{first} | {second}"
        assert [label for label, _ in page.top_labels()] == [s["label"] for s in expected["scores"]]
        page.js("window.before = 1")
        page.call("Page.reload")  # the key is asked for once: the tab keeps it
        wait_for(lambda: page.js("window.before === undefined && document.readyState === 'complete'")
                 and page.text("info"), 30, "the page again")
        assert page.shown("main") and not page.shown("key-form")
