"""`finetune serve`: a model behind an HTTP JSON API, concurrent requests micro-batched into one model call."""


import asyncio
import json
import logging
import os
import time

from finetune.errors import FinetuneError

SERVE_EXTRA = 'pip install "finetune[serve]"'
log = logging.getLogger("finetune.serve")


class BadRequest(Exception):
    """A malformed request: answered as 4xx {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, task: str, max_inputs: int) -> tuple[list, list, int | None, float | None]:
    """(shown, model inputs, top_k, confidence_set) from a /predict body, or BadRequest naming the field."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("body: not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("body: must be a JSON object with an 'inputs' list")
    unknown = set(payload) - {"inputs", "top_k", "confidence_set"}
    if unknown:
        raise BadRequest(f"{min(unknown)}: unknown field (fields: inputs, top_k, confidence_set)")
    if "inputs" not in payload:
        raise BadRequest("inputs: missing; send {\"inputs\": [...]}")
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("inputs: must be a non-empty list")
    if len(inputs) > max_inputs:
        raise BadRequest(f"inputs: {len(inputs)} inputs, at most {max_inputs} per request", status=413)
    top_k = payload.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise BadRequest("top_k: must be a positive integer")
    from finetune.tasks import TASKS, get_task

    if task not in TASKS:
        raise BadRequest(f"task {task}: not served yet", status=501)
    try:  # each task reads its own inputs (texts, pairs, word lists, base64 images)
        parsed = [get_task(task).parse_input(value, i) for i, value in enumerate(inputs)]
    except FinetuneError as error:
        raise BadRequest(str(error)) from None
    return [shown for shown, _ in parsed], [entry for _, entry in parsed], top_k, payload.get("confidence_set")


class Batcher:
    """Requests queued here run together: up to max_batch inputs, waiting at most max_wait_ms for more."""

    def __init__(self, predictor, max_batch: int, max_wait_ms: float):
        from finetune.tasks import get_task

        self.predictor = predictor
        self.task = get_task(predictor.task)  # what a micro-batch computes, and how a request's slice is decoded
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = None

    async def submit(self, inputs: list, top_k: int | None) -> tuple[list, int]:
        if self.worker is None:
            self.worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((inputs, top_k, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0][0])
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                try:
                    job = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                size += len(job[0])
            inputs = [entry for job in jobs for entry in job[0]]
            try:  # the model runs in a thread: the event loop keeps accepting requests meanwhile
                outputs = await loop.run_in_executor(None, self.task.batch_outputs, self.predictor, inputs,
                                                     self.max_batch)
            except Exception as error:  # a bad input the parsers let through fails its batch, not the server
                for *_, future in jobs:
                    if not future.done():
                        future.set_exception(error)
                continue
            start = 0
            for batch_inputs, top_k, future in jobs:
                rows = outputs[start:start + len(batch_inputs)]
                start += len(batch_inputs)
                if not future.done():
                    future.set_result((self.task.decode_outputs(self.predictor, rows, top_k), len(inputs)))


PAGE = """<!doctype html><meta charset="utf-8"><title>finetune serve</title>
<h1>finetune serve</h1><p id="info"></p>
<textarea id="text" rows="4" cols="60" placeholder="a text to label"></textarea><br>
<input type="file" id="image" accept="image/*"> <button id="go">predict</button>
<p>label: <b id="label"></b></p><pre id="out"></pre>
<script>
const out = document.getElementById("out"), shown = document.getElementById("label");
fetch("info").then(r => r.json()).then(i => document.getElementById("info").textContent = i.task + ": " +
  (i.labels || []).join(", "));
function summary(p) {  // the label, the labels over the threshold, the value, or the entities
  if (p.label !== undefined) return p.label;
  if (p.labels !== undefined) return p.labels.join(", ") || "(none)";
  if (p.value !== undefined) return String(p.value);
  if (p.entities !== undefined) return p.entities.map(e => e.word + ": " + e.label).join(", ") || "(no entities)";
  return "";
}
document.getElementById("go").onclick = async () => {
  const file = document.getElementById("image").files[0];
  let input = document.getElementById("text").value;
  if (file) input = await new Promise(ok => { const r = new FileReader();
    r.onload = () => ok(r.result.split(",")[1]); r.readAsDataURL(file); });
  shown.textContent = "";
  const r = await fetch("predict", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({inputs: [input], top_k: 3})});
  const answer = await r.json();
  out.textContent = JSON.stringify(answer, null, 1);
  shown.textContent = answer.predictions ? summary(answer.predictions[0]) : "error: " + answer.error;
};
</script>
"""


def build_app(predictor, api_key: str | None = None, max_batch: int = 32, max_wait_ms: float = 5.0,
              max_inputs: int = 256, max_body_mb: float = 8.0):
    """The FastAPI app serving `predictor` (anything finetune.load returns)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError:
        raise FinetuneError(f"fastapi: not installed, and serve needs it; {SERVE_EXTRA}") from None

    app = FastAPI(title="finetune serve", docs_url=None, redoc_url=None, openapi_url=None)
    batcher = Batcher(predictor, max_batch, max_wait_ms)
    max_bytes = int(max_body_mb * 1024 * 1024)
    info = {"task": predictor.task, "labels": predictor.labels,
            "backbone": predictor.spec.get("backbone") or predictor.source,
            "format": predictor.spec.get("format", "torch"), "problem": predictor.problem}

    def error(message: str, status: int):
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def guard_and_log(request: Request, call_next):
        start = time.perf_counter()
        request.state.batch = 0
        guarded = api_key is not None and request.url.path != "/health"
        if guarded and request.headers.get("authorization", "") != f"Bearer {api_key}":
            response = error("Authorization: missing or wrong bearer key", 401)
            _log(request, response, start)
            return response
        try:
            response = await call_next(request)
        except Exception as failure:  # never a traceback to the client; the log says what broke
            log.error("internal error: %s: %s", failure.__class__.__name__, failure)
            response = error("internal error; see the server log", 500)
        _log(request, response, start)
        return response

    def _log(request, response, start):
        batch = response.headers.get("x-batch-size", "-")
        ms = (time.perf_counter() - start) * 1000
        log.info("%s %s %d %.1fms batch=%s", request.method, request.url.path, response.status_code, ms, batch)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def get_info():
        return info

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    @app.post("/predict")
    async def predict(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            return error(f"body: larger than --max-body-mb {max_body_mb:g}", 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                return error(f"body: larger than --max-body-mb {max_body_mb:g}", 413)
        try:
            shown, inputs, top_k, level = parse_request(bytes(body), predictor.task, max_inputs)
            cutoff = None if level is None else predictor.confidence_cutoff(level)  # a bad one answers 400
            results, batch = await batcher.submit(inputs, top_k if cutoff is None else None)
            if cutoff is not None:
                results = predictor.with_confidence_sets(results, cutoff, top_k)
        except BadRequest as bad:
            return error(str(bad), bad.status)
        except FinetuneError as bad:
            return error(" ".join(str(bad).split()), 400)
        predictions = [{"input": s, **r} for s, r in zip(shown, results)]
        return JSONResponse({"predictions": predictions}, headers={"X-Batch-Size": str(batch)})

    @app.exception_handler(404)
    async def not_found(request, exc):
        return error(f"{request.url.path}: no such endpoint (GET /health, /info, /; POST /predict)", 404)

    @app.exception_handler(405)
    async def wrong_method(request, exc):
        return error(f"{request.url.path}: method {request.method} not allowed", 405)

    return app


def serve(source: str, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
          max_batch: int = 32, max_wait_ms: float = 5.0, max_inputs: int = 256, max_body_mb: float = 8.0) -> int:
    """Load the model and run uvicorn until SIGTERM/SIGINT (requests in flight finish first)."""
    try:
        import uvicorn
    except ImportError:
        raise FinetuneError(f"uvicorn: not installed, and serve needs it; {SERVE_EXTRA}") from None
    from finetune.loading import load_predictor

    for name, value in (("--max-batch", max_batch), ("--max-inputs", max_inputs)):
        if value < 1:
            raise FinetuneError(f"{name}: must be at least 1, got {value}")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise FinetuneError(f"--api-key-env: the variable {api_key_env} is not set or empty; export it first")
    predictor = load_predictor(source)
    app = build_app(predictor, api_key, max_batch, max_wait_ms, max_inputs, max_body_mb)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log.info("serving %s (%s) on http://%s:%d", source, predictor.task, host, port)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning", timeout_graceful_shutdown=30)
    return 0
