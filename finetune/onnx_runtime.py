"""An ONNX export run by onnxruntime behind the Predictor interface (task, labels, logits, predict, decode)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from finetune.errors import FinetuneError
from finetune.predictor import RUN_CONFIG, Predictor, read_run_recipe

EXPORT_FILE = "export.json"
ONNX_FILE = "model.onnx"
ONNX_EXTRA = 'pip install "finetune[onnx]"'


def require_onnx(runtime_only: bool = False) -> None:
    """One line naming the extra when onnx, onnxscript or onnxruntime is missing."""
    import importlib

    names = ("onnxruntime",) if runtime_only else ("onnx", "onnxscript", "onnxruntime")
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise FinetuneError(f"{', '.join(missing)}: not installed, and ONNX needs it; {ONNX_EXTRA}")


def is_export_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / EXPORT_FILE).is_file() and (path / ONNX_FILE).is_file()


def session_threads() -> int:
    """Intra-op threads as torch picks them: OMP_NUM_THREADS when set, else the cores this process may use."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_session(path: str | Path):
    require_onnx(runtime_only=True)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = session_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # its warnings about unused initialisers are not the user's business
    # denormal floats as zero: they arise in softmax and int8 dequantisation, and each one takes the CPU's slow
    # path (the int8 MiniLM: 10% more texts/s)
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxPredictor(Predictor):
    """Predictor whose forward pass is an onnxruntime session; preprocessing and decoding are Predictor's own."""

    def __init__(self, session, preprocess, spec: dict, recipe=None, source: str = "", run_dir=None):
        self.device = "cpu"
        self.model = session
        self.session = session
        self.feeds = [item.name for item in session.get_inputs()]
        self.preprocess = preprocess
        self.spec = spec
        self.recipe = recipe
        self.source = source
        self.run_dir = run_dir

    @classmethod
    def from_folder(cls, folder: str | Path) -> OnnxPredictor:
        folder = Path(folder)
        try:
            info = json.loads((folder / EXPORT_FILE).read_text())
        except json.JSONDecodeError as error:
            raise FinetuneError(f"{folder / EXPORT_FILE}: not valid JSON ({error}); export the model again") from None
        spec = {key: info.get(key) for key in ("task", "problem", "labels", "threshold")}
        spec["format"] = "onnx"
        spec["backbone"] = info.get("backbone")
        from finetune.tasks import get_task

        preprocess = get_task(spec["task"]).onnx_preprocess(folder, info)
        recipe = _source_recipe(folder, info)
        if not spec["backbone"] and recipe is not None:  # /info names what was fine-tuned, not the export folder
            spec["backbone"] = recipe.backbone.name
        return cls(make_session(folder / ONNX_FILE), preprocess, spec, recipe=recipe, source=str(folder))

    @classmethod
    def from_parts(cls, path: str | Path, predictor: Predictor) -> OnnxPredictor:
        """The torch predictor's preprocessing and spec with an ONNX forward pass (the export's parity check)."""
        return cls(make_session(path), predictor.preprocess, dict(predictor.spec), recipe=predictor.recipe,
                   source=str(path), run_dir=predictor.run_dir)

    @property
    def max_length(self) -> int | None:
        if self.recipe is not None:
            return self.recipe.data.max_length
        limit = getattr(self.preprocess, "model_max_length", None)
        return int(limit) if limit is not None and limit < 1_000_000 else None

    def forward(self, batch: dict) -> np.ndarray:
        feeds = {}
        for name in self.feeds:
            value = batch[name]
            value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
            feeds[name] = value.astype(np.float32 if name == "pixel_values" else np.int64, copy=False)
        return self.session.run(None, feeds)[0].astype(np.float32, copy=False)


def _source_recipe(folder: Path, info: dict):
    """The trained run's recipe, so that predict and eval read tables with its columns as they do for the run: the
    copy in export.json, else (an export written before it held one) the source run's config.yaml when it is there."""
    from finetune.recipe import from_dict

    if isinstance(info.get("recipe"), dict):
        return from_dict(info["recipe"], source=str(folder / "export.json"))
    source = Path(info.get("source") or "")
    if info.get("source") and (source / RUN_CONFIG).is_file() and (source / "model").is_dir():
        return read_run_recipe(source)
    return None
