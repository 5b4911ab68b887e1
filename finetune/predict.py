"""`finetune predict`'s inputs: what the command line names, read as the model's task reads inputs."""

from __future__ import annotations

from typing import Any


def expand_inputs(items: list[str], task: str, column: str, pair_column: str | None = None) -> list[tuple[str, Any]]:
    """(what to show, what to predict on) for each input the command line names (`Task.read_inputs`)."""
    from finetune.tasks import get_task

    return get_task(task).read_inputs(items, column, pair_column)


def default_column(predictor) -> str:
    """The table column predict reads inputs from: the run's own, else the recipe default for the task's key."""
    from finetune.recipe import Data
    from finetune.tasks import get_task

    d = predictor.recipe.data if predictor.recipe is not None else Data(train="")
    return getattr(d, get_task(predictor.task).column_key)
