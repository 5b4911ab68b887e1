"""The row-of-logits defaults of `Task` that score with the kit's metrics (one row of logits per input: text and
image classification). Kept out of `finetune.tasks` itself, which `finetune.problems` imports through the token task's
tag functions."""

from __future__ import annotations

from finetune.tasks import Task


class RowTask(Task):
    """A task whose model gives one row of logits per input, decoded and scored by the head's problem."""

    def evaluate(self, predictor, raw, recipe, split: str = "test", batch_size: int = 32,
                 progress: bool | None = None, records: bool = False) -> dict:
        from finetune.evaluation import evaluate_rows

        return evaluate_rows(predictor, raw, recipe, split, batch_size, progress, records)


class TableFeatures:
    """A classical baseline's features (`Task.baseline_features`): `read` takes a split's table (its dict of columns)
    to inputs, then `step` (a scikit-learn transformer, fitted on the training table) to a feature matrix."""

    def __init__(self, read, step=None):
        self.read, self.step = read, step

    def fit_transform(self, table: dict):
        inputs = self.read(table)
        return inputs if self.step is None else self.step.fit_transform(inputs)

    def transform(self, table: dict):
        inputs = self.read(table)
        return inputs if self.step is None else self.step.transform(inputs)
