"""Headless Chromium for the tests: open a page and drive it over the DevTools protocol (a websocket, with the
`websockets` package that uvicorn[standard] brings)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
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

    def text(self, element: str) -> str:
        return self.js(f"document.getElementById({element!r}).textContent")

    def shown(self, element: str) -> bool:
        return self.js(f"document.getElementById({element!r}).offsetParent !== null")

    def type(self, element: str, text: str) -> None:
        self.js(f"document.getElementById({element!r}).focus()")
        self.call("Input.insertText", text=text)  # typed, as a keyboard would enter it
        assert self.js(f"document.getElementById({element!r}).value") == text

    def click(self, element: str) -> None:
        self.js(f"document.getElementById({element!r}).click()")


@contextlib.contextmanager
def open_page(url: str, profile: Path, page_class=Page):
    """A headless Chromium showing url; yields its page (a page_class) once the document has loaded."""
    from websockets.sync.client import connect

    browser = subprocess.Popen([CHROMIUM, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"  # Chromium writes the port it picked here
        port = wait_for(lambda: active.is_file() and active.read_text().split("\n")[0].strip(), 60, "Chromium")

        def page_socket():
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
            pages = [t for t in targets if t.get("type") == "page" and t.get("url", "").startswith(url)]
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        with connect(wait_for(page_socket, 30, "the page's tab"), max_size=None) as socket:
            page = page_class(socket)
            wait_for(lambda: page.js("document.readyState") == "complete", 30, "the page")
            yield page
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=15)
        except subprocess.TimeoutExpired:
            browser.kill()
        shutil.rmtree(profile, ignore_errors=True)
