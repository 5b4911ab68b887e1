"""The page at `/` in a real headless Chromium: a text typed into it comes back as the model's label.

Drives Debian's `chromium` over the DevTools protocol (a websocket, with the `websockets` package uvicorn[standard]
brings): focus the text box, type with Input.insertText, click predict, read the label the page shows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import subprocess_env
from test_serve import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-allow-origins=*", "--remote-debugging-address=127.0.0.1"]


def wait_for(check, seconds: float, what: str):
    """check() until it returns something truthy, for at most `seconds` (bounded: a hung browser fails the test)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")


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
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(folder), "--port", str(port)],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: urllib.request.urlopen(url + "/health", timeout=1).status == 200, 90, "finetune serve")
        yield url, folder
    finally:
        process.terminate()
        process.wait(timeout=30)


class Page:
    """One Chromium tab over the DevTools websocket: evaluate JavaScript, type text."""

    def __init__(self, socket):
        self.socket, self.next_id = socket, 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


def test_a_text_typed_into_the_page_returns_the_models_label(served, tmp_path):
    from websockets.sync.client import connect

    import finetune

    url, run = served
    text = "the bread and the soup today"
    expected = finetune.load(run).predict(text)["label"]
    profile = tmp_path / "profile"
    browser = subprocess.Popen([CHROMIUM, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                url + "/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"  # Chromium writes the port it picked here
        port = wait_for(lambda: active.is_file() and active.read_text().split("\n")[0].strip(), 60, "Chromium")

        def page_socket():
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
            pages = [t for t in targets if t.get("type") == "page" and t.get("url", "").startswith(url)]
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        with connect(wait_for(page_socket, 30, "the page's tab"), max_size=None) as socket:
            page = Page(socket)
            wait_for(lambda: page.js("document.readyState") == "complete"
                     and page.js("document.getElementById('info').textContent"), 30, "the page and /info")
            assert "text-classification" in page.js("document.getElementById('info').textContent")
            page.js("document.getElementById('text').focus()")
            page.call("Input.insertText", text=text)  # typed, as a keyboard would enter it
            assert page.js("document.getElementById('text').value") == text
            page.js("document.getElementById('go').click()")
            shown = wait_for(lambda: page.js("document.getElementById('label').textContent"), 30, "the label")
            assert shown == expected
            answer = json.loads(page.js("document.getElementById('out').textContent"))
            assert answer["predictions"][0]["input"] == text and len(answer["predictions"][0]["scores"]) == 3
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=15)
        except subprocess.TimeoutExpired:
            browser.kill()
        shutil.rmtree(Path(profile), ignore_errors=True)
