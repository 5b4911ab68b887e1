"""By-hand check of `finetune serve`: a real server on a loopback port with an API key, 16 concurrent clients sending
good requests mixed with malformed and unauthorised ones (every fifth), each good answer compared with
`finetune predict --json` on the same texts, the server healthy afterwards, then SIGTERM.

    python scripts/check_serve.py EXPORT_OR_RUN test.csv [--column text] [--texts 400] [--requests 500]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from bench_deploy import start_server  # scripts/ is this script's folder: on sys.path

KEY = "check-serve-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BAD = [(b"not json", AUTH), (b'{"inputs": []}', AUTH), (b'{"inputs": [1]}', AUTH),
       (b'{"inputs": ["a"], "top_k": 0}', AUTH), (b'{"wrong": ["a"]}', AUTH), (b'{"inputs": [""]}', AUTH),
       (b'{"inputs": "a text"}', AUTH), (b"[1, 2]", AUTH), (json.dumps({"inputs": ["a"] * 300}).encode(), AUTH),
       (b'{"inputs": [{"text": "a", "text_pair": 3}]}', AUTH), (b'{"inputs": ["a"]}', {}),
       (b'{"inputs": ["a"]}', {"Authorization": "Bearer wrong"})]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--column", default="text")
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    with open(args.data, newline="", encoding="utf-8") as handle:
        texts = [row[args.column] for row in csv.DictReader(handle)][:args.texts]
    server, url = start_server(args.model, "--api-key-env", "CHECK_KEY", CHECK_KEY=KEY)
    try:
        with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=32)) as client:
            def send(i: int):
                if i % 5 == 4:
                    body, headers = BAD[i % len(BAD)]
                    answer = client.post("/predict", content=body,
                                         headers={**headers, "content-type": "application/json"})
                    return "bad", answer.status_code, None, i
                answer = client.post("/predict", json={"inputs": [texts[i % len(texts)]]}, headers=AUTH)
                label = answer.json()["predictions"][0]["label"] if answer.status_code == 200 else None
                return "good", answer.status_code, label, i % len(texts)

            start = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(send, range(args.requests)))
            seconds = time.perf_counter() - start
            healthy = client.get("/health").status_code == 200
            info = client.get("/info", headers=AUTH).json()
    finally:
        server.terminate()
        server.wait(timeout=60)
    done = subprocess.run([sys.executable, "-m", "finetune", "predict", args.model, args.data, "--column", args.column,
                           "--json"], capture_output=True, text=True, check=True)
    expected = [json.loads(line)["label"] for line in done.stdout.splitlines()][:args.texts]
    good = [r for r in results if r[0] == "good"]
    bad = [r for r in results if r[0] == "bad"]
    print(json.dumps({
        "requests": len(results), "seconds": round(seconds, 1), "good": len(good),
        "good_200": sum(r[1] == 200 for r in good), "good_same_as_predict": sum(r[2] == expected[r[3]] for r in good),
        "malformed_or_unauthorised": len(bad), "answered_4xx": sum(400 <= r[1] < 500 for r in bad),
        "statuses_of_bad": sorted({r[1] for r in bad}), "healthy_after": healthy, "info": info,
        "exit_after_sigterm": server.returncode,
    }))


if __name__ == "__main__":
    main()
