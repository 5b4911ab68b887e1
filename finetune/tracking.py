"""Experiment trackers: train.log_with's names as accelerate's trackers, checked for their packages up front."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from finetune.errors import FinetuneError

# tracker -> (the modules any one of which it needs, the pip package that provides it)
PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "aim": (("aim",), "aim"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "trackio": (("trackio",), "trackio"),
    "swanlab": (("swanlab",), "swanlab"),
}


def check_trackers(names: list[str]) -> None:
    """A tracker whose package is missing is one line naming the key and the package, before anything runs."""
    for name in names:
        modules, package = PACKAGES[name]
        if not any(importlib.util.find_spec(module) is not None for module in modules):
            raise FinetuneError(
                f"train.log_with: {name} is not installed; `pip install {package}`, or drop it from train.log_with"
            )


def trackers(names: list[str], out: Path) -> list | None:
    """accelerate's log_with: tensorboard writes to <run>/tensorboard/ whatever train.log_project says."""
    from accelerate.tracking import TensorBoardTracker

    check_trackers(names)
    chosen = [TensorBoardTracker("tensorboard", str(out)) if name == "tensorboard" else name for name in names]
    return chosen or None  # none: accelerate warns about an empty list


def init_kwargs(out: Path) -> dict:
    """Each run named after its folder in the trackers that name runs."""
    return {"wandb": {"name": out.name}, "mlflow": {"run_name": out.name}}
