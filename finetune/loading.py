"""`finetune.load`: a run folder, a model folder, a hub model id or an ONNX export -> a Predictor."""

from __future__ import annotations

import re
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.predictor import RUN_CONFIG, Predictor, read_run_recipe
from finetune.tasks import task_of_model_folder

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def load_model_folder(directory: str | Path):
    """(model, tokenizer or image transform, spec) from a `model/` folder: transformers, timm or finetune's format,
    loaded by the task whose folder it is. Vision models are called as `model(pixel_values=...)`."""
    directory = Path(directory)
    return task_of_model_folder(directory).load_model_folder(directory)


def load_predictor(source: str | Path, device: str | None = None) -> Predictor:
    """A Predictor for a run folder, a model folder (transformers, timm or finetune's format) or a hub model id."""
    from finetune.onnx_runtime import is_export_folder

    if is_export_folder(source):  # `finetune export` output: onnxruntime behind the same interface
        from finetune.onnx_runtime import OnnxPredictor

        return OnnxPredictor.from_folder(source)
    model_dir, run_dir = resolve(source)
    recipe = read_run_recipe(run_dir) if run_dir is not None else None
    try:
        model, preprocess, spec = load_model_folder(model_dir)
    except FinetuneError:
        raise
    except (OSError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise FinetuneError(f"{model_dir}: cannot load the model ({error.__class__.__name__}: {first})") from None
    return Predictor(model, preprocess, spec, recipe=recipe, source=str(source), run_dir=run_dir, device=device,
                     model_dir=model_dir)
