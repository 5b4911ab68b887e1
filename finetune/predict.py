"""Prediction: a trained model from a run folder, a model folder or a hub id, batched over texts or images."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from finetune.errors import FinetuneError

RUN_CONFIG = "config.yaml"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PROGRESS_MIN_BATCHES = 4  # a bar for inputs that take a while; a handful of inputs print nothing extra


def resolve(source: str | Path) -> tuple[Path, Path | None]:
    """(model folder, run folder or None) for a run folder, a `model/` folder or a hub model id."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "model").is_dir() and (path / RUN_CONFIG).is_file():
            return path / "model", path
        if (path / "config.json").is_file():
            run = path.parent if path.name == "model" and (path.parent / RUN_CONFIG).is_file() else None
            return path, run
        if (path / RUN_CONFIG).is_file():
            raise FinetuneError(f"{source}: the run has no model/ folder yet (unfinished or failed run?)")
        raise FinetuneError(f"{source}: not a run folder (config.yaml + model/) or a model folder (config.json)")
    if path.exists():
        raise FinetuneError(f"{source}: is a file; give a run folder, a model folder or a hub model id")
    if not HUB_ID.match(str(source)):
        raise FinetuneError(f"{source}: no such run or model folder (a hub model id looks like owner/name)")
    return _download(str(source)), None


def _download(repo_id: str) -> Path:
    """The hub repo's files in the local hub cache (no network when HF_HUB_OFFLINE=1 and it is cached)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:  # not found, gated, offline and not cached, network down: all mean "cannot get it"
        first = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
        raise FinetuneError(
            f"{repo_id}: not a local folder, and the hub model cannot be fetched ({error.__class__.__name__}: {first})"
        ) from None


def read_run_recipe(run_dir: Path):
    from finetune.recipe import from_dict, parse_yaml

    path = run_dir / RUN_CONFIG
    raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(raw, dict):
        raise FinetuneError(f"{path}: not a recipe mapping; the run folder is damaged")
    return from_dict(raw, source=str(path))


def load(source: str | Path, device: str | None = None) -> Predictor:
    """A Predictor for a run folder, a model folder (transformers, timm or finetune's format) or a hub model id."""
    from finetune.model import load as load_model
    from finetune.onnx_export import is_export_folder

    if is_export_folder(source):  # `finetune export` output: onnxruntime behind the same interface
        from finetune.onnx_runtime import OnnxPredictor

        return OnnxPredictor.from_folder(source)
    model_dir, run_dir = resolve(source)
    recipe = read_run_recipe(run_dir) if run_dir is not None else None
    try:
        model, preprocess, spec = load_model(model_dir)
    except FinetuneError:
        raise
    except (OSError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise FinetuneError(f"{model_dir}: cannot load the model ({error.__class__.__name__}: {first})") from None
    return Predictor(model, preprocess, spec, recipe=recipe, source=str(source), run_dir=run_dir, device=device)


class Predictor:
    """A trained model with its preprocessing: `predict(inputs)` gives label names and scores, batched.

    Unpacks as `model, preprocess, spec = finetune.load(path)` too: the eval-mode module, the tokenizer or image
    transform, and the spec (problem, labels, threshold).
    """

    def __init__(self, model, preprocess, spec: dict, recipe=None, source: str = "", run_dir: Path | None = None,
                 device: str | None = None):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(self.device).type == "cpu":  # batches of predictions reuse the pages the last one freed
            from finetune import allocator

            allocator.keep_freed_memory()
        self.model = model.eval()  # moved to the device at the first prediction: unpacked, it is on the CPU as loaded
        self.preprocess = preprocess
        self.spec = spec
        self.recipe = recipe
        self.source = source
        self.run_dir = run_dir
        from finetune.precision import for_inference

        self.precision = for_inference(run_dir, self.device)  # a bf16 run predicts under bf16 autocast where native

    def __iter__(self):
        return iter((self.model, self.preprocess, self.spec))

    def __repr__(self) -> str:
        return f"Predictor({self.source!r}, task={self.task}, problem={self.problem}, labels={self.labels})"

    @property
    def task(self) -> str:
        return self.spec.get("task") or (
            "image-classification" if self.spec.get("format") == "timm" else "text-classification"
        )

    @property
    def problem(self) -> str:
        return self.spec.get("problem", "single_label")

    @property
    def labels(self) -> list[str] | None:
        return self.spec.get("labels")

    @property
    def threshold(self) -> float:
        return float(self.spec.get("threshold") or 0.5)

    @property
    def max_length(self) -> int | None:
        """Tokens per text: the run's data.max_length, else the tokenizer's (set to it at export), else the model's."""
        if self.recipe is not None:
            return self.recipe.data.max_length
        limit = getattr(self.preprocess, "model_max_length", None)
        if limit is not None and limit < 1_000_000:
            return int(limit)
        config = getattr(self.model, "config", None) or getattr(getattr(self.model, "backbone", None), "config", None)
        return getattr(config, "max_position_embeddings", None)

    # ---------------------------------------------------------------------------------------------------------------

    def logits(self, inputs: Iterable, batch_size: int = 32, progress: bool | None = None) -> np.ndarray:
        """Raw model outputs, one row per input (texts, or image paths / bytes / arrays / PIL images)."""
        inputs = list(inputs)
        if not inputs:
            return np.zeros((0, len(self.labels or [None])), dtype=np.float32)
        batches = -(-len(inputs) // batch_size)
        show = progress if progress is not None else batches >= PROGRESS_MIN_BATCHES and sys.stderr.isatty()
        from finetune.tasks import inputs_of

        if inputs_of(self.task) == "image":
            return self._image_logits(inputs, batch_size, show)
        return self._text_logits(inputs, batch_size, show)

    def _forward(self, batch: dict) -> np.ndarray:
        import torch

        from finetune.precision import autocast

        self.model.to(self.device)
        with torch.inference_mode(), autocast(self.device, self.precision):
            output = self.model(**{key: value.to(self.device) for key, value in batch.items()})
        logits = output.logits if hasattr(output, "logits") else output
        return logits.float().cpu().numpy()

    def _text_logits(self, texts: list, batch_size: int, show: bool) -> np.ndarray:
        from tqdm.auto import tqdm

        firsts, seconds = [], []
        for i, text in enumerate(texts):  # a text, or a sentence pair as {"text", "text_pair"} or (text, pair)
            if isinstance(text, dict) and isinstance(text.get("text"), str) and isinstance(text.get("text_pair"), str):
                text = (text["text"], text["text_pair"])
            pair = isinstance(text, tuple) and len(text) == 2 and all(isinstance(t, str) for t in text)
            if not (isinstance(text, str) or pair):
                raise FinetuneError(f"input {i + 1}: a text model takes strings or {{\"text\", \"text_pair\"}} pairs, "
                                    f"got {type(text).__name__}")
            firsts.append(text[0] if pair else text)
            seconds.append(text[1] if pair else None)
        paired = any(second is not None for second in seconds)
        if paired and not all(second is not None for second in seconds):
            raise FinetuneError("inputs: give every input as a pair, or none (a batch is encoded one way)")
        # longest first: batches of similar length waste little on padding, and a too-long batch fails early
        size = [len(a) + len(b or "") for a, b in zip(firsts, seconds)]
        order = sorted(range(len(texts)), key=lambda i: -size[i])
        rows: list[np.ndarray] = [None] * len(texts)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="predict", unit="batch", disable=not show):
            positions = order[start:start + batch_size]
            batch = self.preprocess(
                [firsts[i] for i in positions], [seconds[i] for i in positions] if paired else None,
                truncation="longest_first", max_length=self.max_length, padding=True, return_tensors="pt",
            )
            for i, row in zip(positions, self._forward(dict(batch))):
                rows[i] = row
        return np.stack(rows)

    def _image_logits(self, entries: list, batch_size: int, show: bool) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        from finetune.tasks.image_classification.files import load_image, unreadable

        for i, entry in enumerate(entries):
            if type(entry).__module__.startswith("PIL."):
                continue
            if isinstance(entry, Path):
                entry = str(entry)
            reason = unreadable(entry)
            if reason is not None:
                where = f"'{entry}'" if isinstance(entry, str) else f"input {i + 1}"
                raise FinetuneError(f"image {where}: {reason}")
        rows = []
        for start in tqdm(range(0, len(entries), batch_size), desc="predict", unit="batch", disable=not show):
            chunk = entries[start:start + batch_size]
            pixels = torch.stack([self.preprocess(load_image(str(e) if isinstance(e, Path) else e)) for e in chunk])
            rows.append(self._forward({"pixel_values": pixels}))
        return np.concatenate(rows)

    # ---------------------------------------------------------------------------------------------------------------

    def predict(self, inputs, top_k: int | None = None, batch_size: int = 32, progress: bool | None = None):
        """One dict per input; a single text, path or image gives a single dict.

        single_label: {"label", "score", "scores": [{"label", "score"}, ...] best first (top_k of them, default all)}
        multi_label: {"labels": those over the threshold, best first, "scores": [...] as above}
        regression: {"value": the prediction in the training targets' units}
        """
        from finetune.tasks import get_task

        single = isinstance(inputs, (str, Path, bytes, np.ndarray, dict)) or type(inputs).__module__.startswith("PIL.")
        task = get_task(self.task)
        if hasattr(task, "predict"):  # outputs that are not one row of logits per input (a tag per word)
            results = task.predict(self, [inputs] if single else list(inputs), top_k, batch_size)
            return results[0] if single else results
        logits = self.logits([inputs] if single else inputs, batch_size, progress)
        results = self.decode(logits, top_k)
        return results[0] if single else results

    def decode(self, logits: np.ndarray, top_k: int | None = None) -> list[dict]:
        if self.problem == "regression":
            return [{"value": float(row.reshape(-1)[0])} for row in logits]
        labels = self.labels or [str(i) for i in range(logits.shape[-1])]
        scores = probabilities(logits, self.problem)
        results = []
        for row in scores:
            order = np.argsort(-row, kind="stable")
            ranked = [{"label": labels[j], "score": float(row[j])} for j in order[:top_k]]
            if self.problem == "single_label":
                results.append({"label": labels[order[0]], "score": float(row[order[0]]), "scores": ranked})
            else:
                chosen = [labels[j] for j in order if row[j] > self.threshold]
                results.append({"labels": chosen, "scores": ranked})
        return results


def probabilities(logits: np.ndarray, problem: str) -> np.ndarray:
    """Softmax for single_label, per-label sigmoid for multi_label (as the trainer's losses define them)."""
    from finetune.problems import get

    return get(problem).probabilities(logits)


# ---------------------------------------------------------------------------------------------------------------
# Inputs as the command line gives them: texts, text files, images, image folders, table columns.


def _table_column(path: Path, column: str, option: str) -> list[Any]:
    from finetune.data import FILE_BUILDERS, open_dataset, require_columns

    suffix = path.suffix.lower()
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if path.stat().st_size == 0:
        raise FinetuneError(f"{path}: is empty")
    table = open_dataset(FILE_BUILDERS[suffix], data_files=str(path), split="train", what=str(path), **kwargs)
    require_columns(table, str(path), {option: column})
    return list(table[column])


def _image_files(folder: Path) -> list[Path]:
    from finetune.tasks.image_classification.files import IMAGE_EXTENSIONS

    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(path)
    return found


def expand_inputs(items: list[str], task: str, column: str, pair_column: str | None = None) -> list[tuple[str, Any]]:
    """(what to show, what to predict on) for each input the command line names.

    Text models: a .txt file gives one text per non-empty line, a csv/tsv/json/jsonl/parquet file its `column`,
    anything else is a text. Image models: an image file, a folder of images (recursive, sorted), or a table whose
    `column` holds image paths (relative to the table) or bytes.
    """
    from finetune.data import FILE_BUILDERS

    from finetune.tasks import get_task, inputs_of

    read_file = getattr(get_task(task), "read_inputs", None)  # a task's own input files (CoNLL sentences)
    expanded: list[tuple[str, Any]] = []
    for item in items:
        path = Path(item).expanduser()
        is_file = path.is_file()
        suffix = path.suffix.lower() if is_file else ""
        found = read_file(path) if read_file is not None and is_file else None
        if found is not None:
            expanded += found
            continue
        if inputs_of(task) == "text":
            if suffix == ".txt":
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
                expanded += [(line, line) for line in lines if line.strip()]
            elif suffix in FILE_BUILDERS and pair_column is not None:  # sentence pairs: two columns
                pairs = _table_column(path, pair_column, "--pair-column")
                for i, (text, pair) in enumerate(zip(_table_column(path, column, "--column"), pairs)):
                    for name, value in ((column, text), (pair_column, pair)):
                        if not isinstance(value, str) or not value.strip():
                            raise FinetuneError(f"{path} row {i + 1}: empty text in column '{name}'")
                    expanded.append((f"{text} | {pair}", {"text": text, "text_pair": pair}))
            elif suffix in FILE_BUILDERS:
                for i, text in enumerate(_table_column(path, column, "--column")):
                    words = isinstance(text, list) and text and all(isinstance(w, str) for w in text)
                    if not words and (not isinstance(text, str) or not text.strip()):
                        raise FinetuneError(f"{path} row {i + 1}: empty text in column '{column}'")
                    expanded.append((" ".join(text) if words else text, text))  # words: token classification
            elif path.is_dir() or (is_file and suffix in _image_extensions()):
                # an existing image or folder: surely not meant as the words of its name
                kind = "a folder" if path.is_dir() else "an image file"
                raise FinetuneError(
                    f"{item}: {kind}, but this is a text model; give texts, .txt files (one text per line) or "
                    f"{'/'.join(ext.lstrip('.') for ext in FILE_BUILDERS)} files with a text column (--column)"
                )
            else:  # a text (a name that is no file or folder here is a text too)
                expanded.append((item, item))
            continue
        from finetune.tasks.image_classification.files import IMAGE_EXTENSIONS, resolve_path

        if path.is_dir():
            files = _image_files(path)
            if not files:
                raise FinetuneError(f"{item}: no image files in this folder "
                                    f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
            expanded += [(str(f), str(f)) for f in files]
        elif is_file and suffix in IMAGE_EXTENSIONS:
            expanded.append((item, str(path)))
        elif is_file and suffix in FILE_BUILDERS:
            for i, value in enumerate(_table_column(path, column, "--column")):
                entry = resolve_path(value, path.parent)
                expanded.append((entry if isinstance(entry, str) else f"{path} row {i + 1}", entry))
        elif not path.exists():
            raise FinetuneError(f"{item}: no such image file or folder")
        else:
            raise FinetuneError(
                f"{item}: not an image ({', '.join(sorted(IMAGE_EXTENSIONS))}), a folder of images, or a "
                f"{'/'.join(ext.lstrip('.') for ext in FILE_BUILDERS)} file with an image column (--column)"
            )
    return expanded


def _image_extensions() -> set:
    from finetune.tasks.image_classification.files import IMAGE_EXTENSIONS

    return set(IMAGE_EXTENSIONS)


def default_column(predictor: Predictor) -> str:
    from finetune.recipe import Data

    from finetune.tasks import get_task

    d = predictor.recipe.data if predictor.recipe is not None else Data(train="")
    return getattr(d, get_task(predictor.task).column_key)

