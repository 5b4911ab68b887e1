"""`finetune serve`: a model behind an HTTP JSON API, concurrent requests micro-batched into one model call."""


import asyncio
import json
import logging
import os
import secrets
import time
from types import SimpleNamespace

from finetune.errors import FinetuneError

SERVE_EXTRA = 'pip install "finetune[serve]"'
PUBLIC = {"/", "/health"}  # the page holds no data (it asks for the key and sends it), and probes carry no key
# a refused body is read and dropped up to this much more and this long before the answer, as nginx's lingering close
# does: a server that closes on a client still sending makes the client see "connection reset" instead of the answer
DISCARD_BYTES = 64 * 1024 * 1024
DISCARD_SECONDS = 10.0
log = logging.getLogger("finetune.serve")


class BadRequest(Exception):
    """A malformed request: answered as 4xx {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def read_payload(body: bytes, fields: tuple[str, ...]) -> dict:
    """A request body as a JSON object holding only `fields`, or BadRequest naming what is wrong."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("body: not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("body: must be a JSON object with an 'inputs' list")
    unknown = set(payload) - set(fields)
    if unknown:
        raise BadRequest(f"{min(unknown)}: unknown field (fields: {', '.join(fields)})")
    return payload


def parse_inputs(payload: dict, task: str, max_inputs: int) -> tuple[list, list]:
    """(shown, model inputs) from a request's "inputs", each read by the task, or BadRequest naming the field."""
    if "inputs" not in payload:
        raise BadRequest("inputs: missing; send {\"inputs\": [...]}")
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("inputs: must be a non-empty list")
    if len(inputs) > max_inputs:
        raise BadRequest(f"inputs: {len(inputs)} inputs, at most {max_inputs} per request", status=413)
    from finetune.tasks import TASKS, get_task

    if task not in TASKS:
        raise BadRequest(f"task {task}: not served yet", status=501)
    try:  # each task reads its own inputs (texts, pairs, word lists, base64 images)
        parsed = [get_task(task).parse_input(value, i) for i, value in enumerate(inputs)]
    except FinetuneError as error:
        raise BadRequest(str(error)) from None
    return [shown for shown, _ in parsed], [entry for _, entry in parsed]


def positive_int(payload: dict, name: str, most: int | None = None) -> int | None:
    value = payload.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1
                              or (most is not None and value > most)):
        raise BadRequest(f"{name}: must be a positive integer" + (f" up to {most}" if most is not None else ""))
    return value


def parse_request(body: bytes, task: str, max_inputs: int) -> tuple[list, list, int | None, float | None]:
    """(shown, model inputs, top_k, confidence_set) from a /predict body, or BadRequest naming the field."""
    payload = read_payload(body, ("inputs", "top_k", "confidence_set"))
    shown, inputs = parse_inputs(payload, task, max_inputs)
    return shown, inputs, positive_int(payload, "top_k"), payload.get("confidence_set")


EXPLAIN_METHODS = ("integrated-gradients", "occlusion", "gradcam")
MAX_EXPLAIN_STEPS = 512  # Integrated Gradients' steps a request may ask for: each costs about a training step


def parse_explain(body: bytes, task: str, max_inputs: int) -> tuple[list, list, str | None, str | None, int]:
    """(shown, model inputs, method, label, steps) from a /explain body, or BadRequest naming the field."""
    payload = read_payload(body, ("inputs", "method", "label", "steps"))
    shown, inputs = parse_inputs(payload, task, max_inputs)
    method, label = payload.get("method"), payload.get("label")
    if method is not None and method not in EXPLAIN_METHODS:
        raise BadRequest(f"method: {method!r} is not one of {', '.join(EXPLAIN_METHODS)}")
    if label is not None and not isinstance(label, str):
        raise BadRequest("label: must be a label name (a string)")
    return shown, inputs, method, label, positive_int(payload, "steps", MAX_EXPLAIN_STEPS) or 64


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


def key_refusal(header: str | None, key: bytes) -> str | None:
    """None when an Authorization header carries the bearer key, else the one-line reason; compared in constant time."""
    if not header:
        return "Authorization: missing; send Authorization: Bearer <key>"
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "Authorization: not a bearer key; send Authorization: Bearer <key>"
    # starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent
    if not secrets.compare_digest(token.strip().encode("latin-1"), key):
        return "Authorization: missing or wrong bearer key"
    return None


async def discard(request, chunks=None) -> None:
    """Read and drop what is left of a refused request's body, up to DISCARD_BYTES and DISCARD_SECONDS."""
    from starlette.requests import ClientDisconnect

    if request.headers.get("expect", "").lower() == "100-continue":
        return  # the client waits for a go-ahead before it sends the body, and none is coming
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DISCARD_BYTES:
        return  # more than the bound: the client sees a reset whatever is read first

    async def drop():
        seen = 0
        async for chunk in chunks if chunks is not None else request.stream():
            seen += len(chunk)
            if seen > DISCARD_BYTES:
                return

    try:
        await asyncio.wait_for(drop(), DISCARD_SECONDS)
    except (asyncio.TimeoutError, ClientDisconnect, RuntimeError):  # slow, gone, or already read: answer now
        pass


async def read_body(request, limit: int) -> bytes | None:
    """The request's body, or None when it is over `limit` bytes (what is left then read and dropped: `discard`)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        await discard(request)
        return None
    body = bytearray()
    chunks = request.stream()
    async for chunk in chunks:  # chunked bodies declare no length: counted as they come
        body += chunk
        if len(body) > limit:
            await discard(request, chunks)
            return None
    return bytes(body)


def api_models(max_inputs: int) -> SimpleNamespace:
    """The pydantic models of the requests and answers, for the OpenAPI schema at /openapi.json and /docs. Requests
    are read by parse_request, which names the field of a malformed one in one line, as pydantic's errors do not."""
    from typing import Annotated, Any, Literal, Union

    from pydantic import BaseModel, ConfigDict, Field

    Text = Annotated[str, Field(min_length=1)]

    class TextPair(BaseModel):
        """A sentence pair, for a model trained on pairs (GET /info says `pairs`)."""

        model_config = ConfigDict(extra="forbid")
        text: Text
        text_pair: Text

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inputs: list[Union[Text, TextPair, list[Text]]] = Field(
            min_length=1, max_length=max_inputs,
            description="one input each: a text, an image as base64 (a data: URL too), a sentence pair, or a list of "
                        "words for token classification; GET /info says what this model takes")
        top_k: int | None = Field(None, ge=1, description="the K best labels with scores (default: all)")

    class Score(BaseModel):
        label: str
        score: float

    class Prediction(BaseModel):
        """As `finetune predict --json` prints it; which fields depends on the problem."""

        model_config = ConfigDict(extra="allow")
        input: str = Field(description="the input as shown: the text, 'text | text_pair', or 'input N' for images")
        label: str | None = Field(None, description="single_label: the best label")
        score: float | None = None
        labels: list[str] | None = Field(None, description="multi_label: the labels over the threshold")
        scores: list[Score] | None = Field(None, description="the top labels with their scores, best first")
        value: float | None = Field(None, description="regression: the prediction")
        entities: list[dict[str, Any]] | None = Field(None, description="token classification: the entities found")

    class PredictResponse(BaseModel):
        predictions: list[Prediction]

    class Info(BaseModel):
        task: str
        labels: list[str] | None
        backbone: str | None
        format: str
        problem: str
        inputs: str = Field(description="what one input is: text or image")
        pairs: bool = Field(description="each input is a sentence pair {text, text_pair}")

    class Health(BaseModel):
        status: str

    class Error(BaseModel):
        error: str = Field(description="one line: the field at fault and what to send instead")

    class ExplainRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inputs: list[Union[Text, TextPair, list[Text]]] = Field(min_length=1, max_length=max_inputs,
                                                               description="as /predict takes them")
        method: Literal[EXPLAIN_METHODS] | None = Field(None, description="default: integrated-gradients "
                                                                          "(an ONNX export: occlusion)")
        label: str | None = Field(None, description="explain this label (default: the predicted one)")
        steps: int | None = Field(None, ge=1, le=MAX_EXPLAIN_STEPS, description="Integrated Gradients' steps (64)")

    class Explanation(BaseModel):
        """As `finetune explain --json` prints it: words with attributions, per entity, or an image's heatmap."""

        model_config = ConfigDict(extra="allow")
        input: str

    class ExplainResponse(BaseModel):
        explanations: list[Explanation]

    return SimpleNamespace(TextPair=TextPair, PredictRequest=PredictRequest, PredictResponse=PredictResponse,
                           Info=Info, Health=Health, Error=Error, ExplainRequest=ExplainRequest,
                           ExplainResponse=ExplainResponse)


PAGE = """<!doctype html><meta charset="utf-8"><title>finetune serve</title>
<style>body{font:15px system-ui,sans-serif;max-width:44em;margin:2em auto;padding:0 1em}textarea{width:100%}
.error{color:#b00020}[hidden]{display:none!important}td{padding:0 1em 0 0}</style>
<h1>finetune serve</h1>
<form id="key-form" hidden><p>This server needs its API key (the value of the variable named by
<code>--api-key-env</code>). The page keeps it in this tab only and sends it with each request.</p>
<input type="password" id="key" autocomplete="off" size="40" aria-label="API key"> <button id="key-go">use key</button>
</form>
<p id="message" class="error" role="alert"></p>
<div id="main" hidden><p id="info"></p>
<textarea id="text" rows="4" placeholder="a text to label"></textarea>
<textarea id="text-pair" rows="4" placeholder="the second text of the pair" hidden></textarea>
<input type="file" id="image" accept="image/*" hidden> <button id="go">predict</button>
<button id="why-go">explain</button>
<p>label: <b id="label"></b></p><table id="top"></table>
<div id="why" aria-label="the words, tinted by how much each pushed the label (green: for, red: against)"></div>
<details><summary>the answer</summary><pre id="out"></pre></details></div>
<script>
const $ = id => document.getElementById(id);
let key = sessionStorage.getItem("finetune-key") || "", info = null;
function askKey(refused) {  // the server has a key: ask for it (again, when the one sent was refused)
  sessionStorage.removeItem("finetune-key"); key = "";
  $("main").hidden = true; $("key-form").hidden = false; $("key").focus();
  $("message").textContent = refused ? "The server refused this key (401): check it and enter it again." : "";
}
async function call(path, options = {}) {  // [status, JSON answer]; a 401 asks for the key
  const headers = Object.assign({}, options.headers, key ? {Authorization: "Bearer " + key} : {});
  const r = await fetch(path, Object.assign({}, options, {headers}));
  if (r.status === 401) { askKey(key !== ""); throw new Error("401"); }
  return [r.status, await r.json()];
}
async function start() {
  const [status, answer] = await call("info");
  if (status !== 200) { $("message").textContent = "error: " + answer.error; return; }
  info = answer;
  $("key-form").hidden = true; $("main").hidden = false; $("message").textContent = "";
  $("info").textContent = info.task + ": " + (info.labels || []).join(", ");
  $("image").hidden = info.inputs !== "image"; $("text").hidden = info.inputs === "image";
  $("text-pair").hidden = !info.pairs; $("why-go").hidden = info.inputs === "image";
}
$("key-form").onsubmit = event => {
  event.preventDefault();
  key = $("key").value.trim(); $("key").value = "";
  if (key) { sessionStorage.setItem("finetune-key", key); start().catch(() => {}); }
};
function summary(p) {  // the label, the labels over the threshold, the value, or the entities
  if (p.label !== undefined) return p.label;
  if (p.labels !== undefined) return p.labels.join(", ") || "(none)";
  if (p.value !== undefined) return String(p.value);
  if (p.entities !== undefined) return p.entities.map(e => e.word + ": " + e.label).join(", ") || "(no entities)";
  return "";
}
async function input() {  // one input as /predict takes it: a text, a pair, or an image as base64
  if (info.inputs === "image") {
    const file = $("image").files[0];
    return file ? await new Promise(ok => { const r = new FileReader();
      r.onload = () => ok(r.result.split(",")[1]); r.readAsDataURL(file); }) : "";
  }
  return info.pairs ? {text: $("text").value, text_pair: $("text-pair").value} : $("text").value;
}
$("go").onclick = async () => {
  $("label").textContent = ""; $("top").replaceChildren(); $("message").textContent = "";
  const [status, answer] = await call("predict", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({inputs: [await input()], top_k: 3})});
  $("out").textContent = JSON.stringify(answer, null, 1);
  if (status !== 200) { $("message").textContent = "error: " + answer.error; return; }
  const p = answer.predictions[0];
  $("label").textContent = summary(p);
  for (const s of p.scores || []) {
    const row = $("top").insertRow(), name = row.insertCell(), score = row.insertCell();
    name.textContent = s.label; score.textContent = s.score.toFixed(3);
  }
};
function tint(title, words) {  // one line of words, each tinted by its attribution (its strength: the colour's)
  const line = document.createElement("p"), most = Math.max(1e-12, ...words.map(w => Math.abs(w.attribution)));
  if (title) line.append(title + ": ");
  for (const w of words) {
    const span = document.createElement("span"), share = Math.abs(w.attribution) / most;
    span.textContent = w.word; span.title = w.attribution.toFixed(4);
    span.style.background = w.attribution >= 0 ? `rgba(0,150,0,${share})` : `rgba(200,0,0,${share})`;
    line.append(span, " ");
  }
  $("why").append(line);
}
$("why-go").onclick = async () => {
  $("why").replaceChildren(); $("message").textContent = "";
  const [status, answer] = await call("explain", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({inputs: [await input()]})});
  $("out").textContent = JSON.stringify(answer, null, 1);
  if (status !== 200) { $("message").textContent = "error: " + answer.error; return; }
  const e = answer.explanations[0];
  if (e.words) tint("why " + e.label, e.words);
  if (e.pair_words) tint("second text", e.pair_words);
  for (const entity of e.entities || []) tint(entity.word + " (" + entity.label + ")", entity.words);
};
start().catch(() => {});
</script>
"""


def build_app(predictor, api_key: str | None = None, max_batch: int = 32, max_wait_ms: float = 5.0,
              max_inputs: int = 256, max_body_mb: float = 8.0):
    """The FastAPI app serving `predictor` (anything finetune.load returns)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
    except ImportError:
        raise FinetuneError(f"fastapi: not installed, and serve needs it; {SERVE_EXTRA}") from None

    app = FastAPI(title="finetune serve", version="1", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json",
                  description="A fine-tuned model. Every path but / and /health needs `Authorization: Bearer <key>` "
                              "when the server runs with --api-key-env.")
    key = api_key.encode("utf-8") if api_key is not None else None

    @app.middleware("http")
    async def guard_and_log(request: Request, call_next):
        start = time.perf_counter()
        refusal = key_refusal(request.headers.get("authorization"), key) if key is not None else None
        if refusal is not None and request.url.path not in PUBLIC:
            await discard(request)
            response = JSONResponse({"error": refusal}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            _log(request, response, start)
            return response
        try:
            response = await call_next(request)
        except Exception as failure:  # never a traceback to the client; the log says what broke
            log.error("internal error: %s: %s", failure.__class__.__name__, failure)
            response = JSONResponse({"error": "internal error; see the server log"}, status_code=500)
        _log(request, response, start)
        return response

    def _log(request, response, start):
        batch = response.headers.get("x-batch-size", "-")
        ms = (time.perf_counter() - start) * 1000
        log.info("%s %s %d %.1fms batch=%s", request.method, request.url.path, response.status_code, ms, batch)

    _add_routes(app, predictor, api_models(max_inputs), Batcher(predictor, max_batch, max_wait_ms), max_inputs,
                max_body_mb)
    return app


def _add_routes(app, predictor, models: SimpleNamespace, batcher: Batcher, max_inputs: int, max_body_mb: float):
    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse

    info = {"task": predictor.task, "labels": predictor.labels,
            "backbone": predictor.spec.get("backbone") or predictor.source,
            "format": predictor.spec.get("format", "torch"), "problem": predictor.problem,
            "inputs": batcher.task.inputs, "pairs": predictor.pairs}
    max_bytes = int(max_body_mb * 1024 * 1024)
    errors = {status: {"model": models.Error} for status in (400, 401, 413, 501)}

    def error(message: str, status: int):
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/health", response_model=models.Health, summary="alive (no key needed)",
             openapi_extra={"security": []})
    async def health():
        return {"status": "ok"}

    @app.get("/info", response_model=models.Info, responses={401: errors[401]}, summary="the model and its inputs")
    async def get_info():
        return info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return PAGE

    # the body is read by hand (its size bounded as it comes, its errors named in one line); the model documents it
    body_schema = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
                   "required": True}

    @app.post("/predict", response_model=models.PredictResponse, responses=errors, summary="labels for inputs",
              openapi_extra={"requestBody": body_schema})
    async def predict(request: Request):
        body = await read_body(request, max_bytes)
        if body is None:
            return error(f"body: larger than --max-body-mb {max_body_mb:g}", 413)
        try:
            shown, inputs, top_k, level = parse_request(body, predictor.task, max_inputs)
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

    _add_explain_route(app, predictor, models, max_inputs, max_bytes, max_body_mb, error)
    schema = app.openapi
    app.openapi = lambda: _with_models(schema(), models)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return error(f"{request.url.path}: no such endpoint (GET /health, /info, /, /docs, /openapi.json; "
                     "POST /predict, /explain)", 404)

    @app.exception_handler(405)
    async def wrong_method(request, exc):
        return error(f"{request.url.path}: method {request.method} not allowed", 405)


def _add_explain_route(app, predictor, models, max_inputs: int, max_bytes: int, max_body_mb: float, error):
    """POST /explain: `finetune explain --json`'s objects for the inputs, one request at a time (Integrated
    Gradients takes gradients through the model), in a thread so /predict keeps answering."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    one_at_a_time = asyncio.Lock()
    body_schema = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ExplainRequest"}}},
                   "required": True}

    @app.post("/explain", response_model=models.ExplainResponse, summary="why the model decided, word by word",
              responses={status: {"model": models.Error} for status in (400, 401, 413, 501)},
              openapi_extra={"requestBody": body_schema})
    async def explain(request: Request):
        body = await read_body(request, max_bytes)
        if body is None:
            return error(f"body: larger than --max-body-mb {max_body_mb:g}", 413)
        try:
            shown, inputs, method, label, steps = parse_explain(body, predictor.task, max_inputs)
            from finetune.explain.api import explain_inputs

            async with one_at_a_time:
                found = await asyncio.to_thread(explain_inputs, predictor, inputs, method, label, steps)
        except BadRequest as bad:
            return error(str(bad), bad.status)
        except FinetuneError as bad:
            return error(" ".join(str(bad).split()), 400)
        return JSONResponse({"explanations": [{"input": s, **e} for s, e in zip(shown, found)]})


def _with_models(schema: dict, models: SimpleNamespace) -> dict:
    """The OpenAPI schema with the request models the hand-read bodies refer to, and the bearer key."""
    components = schema.setdefault("components", {})
    found = components.setdefault("schemas", {})
    for name in ("PredictRequest", "ExplainRequest"):
        request = getattr(models, name).model_json_schema(ref_template="#/components/schemas/{model}")
        found.update(request.pop("$defs", {}))
        found[name] = request
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    schema["security"] = [{"bearer": []}]
    return schema


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
