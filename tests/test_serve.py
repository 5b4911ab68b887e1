"""finetune serve: a real uvicorn process on a loopback port, batching, 4xx errors, auth, shutdown."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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


def test_explain_answers_what_explain_json_computes(server):
    import finetune
    from finetune.explain.api import explain_inputs

    url, run, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    answer = httpx.post(url + "/explain", json={"inputs": TEXTS[:2], "steps": 16}, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    served = answer.json()["explanations"]
    expected = explain_inputs(finetune.load(run), TEXTS[:2], steps=16)
    for text, got, want in zip(TEXTS, served, expected):
        assert got["input"] == text and got["label"] == want["label"]
        assert [w["word"] for w in got["words"]] == [w["word"] for w in want["words"]] == text.split()
        assert all(text[w["start"]:w["end"]] == w["word"] for w in got["words"])
        assert got["words"] and all(abs(a["attribution"] - b["attribution"]) < 1e-4
                                    for a, b in zip(got["words"], want["words"]))
    other = next(label for label in finetune.load(run).labels if label != served[0]["label"])
    asked = httpx.post(url + "/explain", json={"inputs": TEXTS[:1], "label": other, "steps": 8}, headers=headers,
                       timeout=60).json()["explanations"][0]
    assert asked["label"] == other  # the label asked for, not the predicted one
    for body in ({"inputs": TEXTS[:1], "method": "bogus"}, {"inputs": TEXTS[:1], "steps": 0},
                 {"inputs": TEXTS[:1], "steps": 100000}, {"inputs": TEXTS[:1], "label": 3},
                 {"inputs": TEXTS[:1], "label": "no-such-label"}, {"inputs": TEXTS[:1], "top_k": 2}, {"inputs": []},
                 {"inputs": TEXTS[:1], "method": "gradcam"}):
        refused = httpx.post(url + "/explain", json=body, headers=headers, timeout=60)
        assert refused.status_code == 400, (body, refused.status_code, refused.text)
        assert set(refused.json()) == {"error"} and "\n" not in refused.json()["error"]
    assert httpx.post(url + "/explain", json={"inputs": TEXTS[:1]}, timeout=30).status_code == 401


def test_a_request_without_the_key_is_401(server):
    url, _, _ = server
    assert post(url, {"inputs": TEXTS}, key=None).status_code == 401
    assert post(url, {"inputs": TEXTS}, key="wrong").status_code == 401
    assert httpx.get(url + "/health").status_code == 200


def test_a_body_over_the_limit_reaches_a_plain_client_as_its_413(server):
    """20 MB sent whole by urllib (Content-Length) and by http.client (chunked): the server reads and drops the rest
    before it answers, so the client, still sending, reads the 413 instead of a connection reset."""
    url, _, _ = server
    big = b"x" * (20 * 1024 * 1024)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    request = urllib.request.Request(url + "/predict", data=big, headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert json.loads(refused.value.read()) == {"error": "body: larger than --max-body-mb 0.01"}
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # no Content-Length: read until over the limit
    connection.request("POST", "/predict", body=chunks, headers=headers, encode_chunked=True)
    answer = connection.getresponse()
    assert answer.status == 413
    assert json.loads(answer.read()) == {"error": "body: larger than --max-body-mb 0.01"}
    connection.close()
    request = urllib.request.Request(url + "/predict", data=big, headers={**headers, "Authorization": "Bearer no"})
    with pytest.raises(urllib.error.HTTPError) as refused:  # a refused key: the body is dropped the same way
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 401 and set(json.loads(refused.value.read())) == {"error"}
    with socket.create_connection((host, int(port)), timeout=30) as waiting:  # asks before sending: answered at once
        waiting.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\nExpect: "
                        f"100-continue\r\nContent-Length: {len(big)}\r\n\r\n".encode())
        assert waiting.recv(65536).startswith(b"HTTP/1.1 413 ")
    assert post(url, {"inputs": TEXTS}).status_code == 200  # still answering


def test_the_page_is_public_and_holds_no_data_while_docs_need_the_key(server):
    url, _, _ = server
    page = httpx.get(url + "/")  # no key: the page asks for it and sends it itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    info = httpx.get(url + "/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["inputs"] == "text" and info["pairs"] is False
    assert not [word for word in [info["task"], *info["labels"]] if word in page.text]
    assert "Bearer" in page.text and "sessionStorage" in page.text
    for path in ("/docs", "/openapi.json", "/info"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY}x"},
                        {"Authorization": f"Bearer {KEY[:-1]}"}):
            refused = httpx.get(url + path, headers=headers)
            assert refused.status_code == 401, (path, headers)
            assert set(refused.json()) == {"error"} and "\n" not in refused.json()["error"]
            assert refused.json()["error"].startswith("Authorization: ")
    docs = httpx.get(url + "/docs", headers={"Authorization": f"Bearer {KEY}"})
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_the_openapi_schema_takes_what_the_server_takes_and_refuses_what_it_refuses(server):
    from jsonschema import Draft202012Validator

    url, _, _ = server
    spec = httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**body, "components": spec["components"]})
    answer = spec["paths"]["/predict"]["post"]["responses"]
    assert {"200", "400", "401", "413"} <= set(answer) and spec["components"]["securitySchemes"]
    good = [{"inputs": TEXTS}, {"inputs": TEXTS[:1], "top_k": 2}, {"inputs": [{"text": "a", "text_pair": "b"}]}]
    for request in good:
        assert validator.is_valid(request) and post(url, request).status_code == 200, request
    # the malformed bodies that are JSON, less the one only a text model refuses (a list of words is a token model's
    # input) and the one refused for its size in bytes
    structural = [json.loads(body) for body in MALFORMED[1:14] if body != b'{"inputs": [["a"]]}']
    assert len(structural) == 12
    for request in structural:
        assert not validator.is_valid(request), request
        assert 400 <= post(url, request).status_code < 500


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


def test_serve_help_gives_every_option_a_help_and_its_default_and_export_takes_a_hub_id(capfd):
    import argparse

    from conftest import call_main

    from finetune.cli import build_parser

    verbs = next(a for a in build_parser()._actions if a.dest == "verb").choices
    options = [a for a in verbs["serve"]._actions
               if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help"]  # --debug is shared, hidden
    assert {"host", "port", "api_key_env", "max_body_mb"} <= {a.dest for a in options}
    for action in options:
        assert action.help and (action.default is None or "%(default)s" in action.help), action.dest
    shown = call_main(capfd, "serve", "--help").stdout
    assert "(default: 127.0.0.1" in shown and "(default: 8000)" in shown and "(default: 8.0)" in shown
    assert "hub model id (owner/name)" in " ".join(call_main(capfd, "export", "--help").stdout.split())
