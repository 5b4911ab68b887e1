"""finetune serve: a real uvicorn process on a loopback port, batching, 4xx errors, auth, shutdown."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import recipe_dict, subprocess_env, to_recipe

from finetune.train import train

TEXTS = ["the bread today", "a goal of news", "very robot story code", "salad and soup"]
KEY = "s3cret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_bert, tiny_data, tmp_path_factory):
    """A trained tiny run served with an API key; yields (base url, run folder, process)."""
    root = tmp_path_factory.mktemp("serve")
    train(to_recipe(recipe_dict(tiny_bert, tiny_data, root / "run", **{"train.epochs": 2})))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", "serve", str(root / "run"), "--port", str(port), "--api-key-env", "KEY",
         "--max-wait-ms", "50", "--max-inputs", "8", "--max-body-mb", "0.01"],
        env=subprocess_env(KEY=KEY), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):  # bounded: 60 s to start
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        process.kill()
        raise AssertionError(process.stdout.read())
    yield url, root / "run", process
    if process.poll() is None:
        process.kill()


def post(url, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(url + "/predict", json=body, headers=headers, timeout=30, **kwargs)
    return httpx.post(url + "/predict", content=body, headers=headers, timeout=30, **kwargs)


def test_predictions_are_what_predict_json_prints(server, capfd):
    from conftest import call_main

    url, run, _ = server
    answer = post(url, {"inputs": TEXTS, "top_k": 2})
    assert answer.status_code == 200
    result = call_main(capfd, "predict", run, *TEXTS, "--json", "--top-k", "2")
    printed = [json.loads(line) for line in result.stdout.splitlines()]  # JSON Lines
    served = answer.json()["predictions"]
    assert [p["label"] for p in served] == [p["label"] for p in printed]
    assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(served, printed))
    info = httpx.get(url + "/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert {"task", "labels", "backbone", "format"} <= set(info)


def test_concurrent_requests_are_batched(server):
    url, _, _ = server
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda text: post(url, {"inputs": [text]}), TEXTS * 4))
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers]
    assert max(int(a.headers["x-batch-size"]) for a in answers) > 1


MALFORMED = [
    b"not json", b"[1, 2]", b"{}", b'{"inputs": "a text"}', b'{"inputs": []}', b'{"inputs": [1]}',
    b'{"inputs": [null]}', b'{"inputs": [["a"]]}', b'{"inputs": [""]}', b'{"inputs": ["a"], "top_k": 0}',
    b'{"inputs": ["a"], "top_k": "2"}', b'{"inputs": ["a"], "top_k": true}', b'{"inputs": ["a"], "extra": 1}',
    json.dumps({"inputs": ["a"] * 9}).encode(), json.dumps({"inputs": ["a" * 20000]}).encode(),
    b'{"inputs": ["a"]', b"\xff\xfe",
]


def test_every_malformed_request_is_a_4xx_naming_the_field(server):
    url, _, _ = server
    for body in MALFORMED:
        answer = post(url, body)
        assert 400 <= answer.status_code < 500, (body[:40], answer.status_code, answer.text)
        assert set(answer.json()) == {"error"} and "\n" not in answer.json()["error"]
    assert httpx.get(url + "/nothing", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert post(url, {"inputs": TEXTS}).status_code == 200  # still answering


def test_a_request_without_the_key_is_401(server):
    url, _, _ = server
    assert post(url, {"inputs": TEXTS}, key=None).status_code == 401
    assert post(url, {"inputs": TEXTS}, key="wrong").status_code == 401
    assert httpx.get(url + "/health").status_code == 200


def send_raw(url: str, body: dict) -> socket.socket:
    """A whole POST /predict written to a socket of its own; the answer is read later (read_status)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    connection = socket.create_connection((host, int(port)), timeout=30)
    connection.sendall(head + payload)
    return connection


def read_status(connection: socket.socket) -> tuple[int, bytes]:
    with connection:
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def test_sigterm_lets_requests_in_flight_finish(server):
    url, _, process = server
    assert post(url, {"inputs": TEXTS}).status_code == 200  # warm: the model has run once
    # four requests fully sent (the most one request may send here), then one more round trip: the server's loop
    # has answered a connection made after theirs, so it has taken theirs in too (a fixed sleep lost that race on
    # a machine busy with two test workers)
    sent = [send_raw(url, {"inputs": TEXTS * 2}) for _ in range(4)]
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    process.send_signal(signal.SIGTERM)
    answers = [read_status(connection) for connection in sent]
    assert [status for status, _ in answers] == [200] * len(answers), [text for _, text in answers]
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful stop
    log = process.stdout.read()
    assert "POST /predict 200" in log and KEY not in log
