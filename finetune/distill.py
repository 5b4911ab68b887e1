"""Distillation (`distill:`): the teacher loaded and checked against the student's task and labels, its outputs per
row (computed once where the inputs do not change between epochs) or per batch, the unlabelled rows it labels softly,
and the loss that mixes its soft targets with the labels' (each problem's `soft_loss`)."""

from __future__ import annotations

import time
from pathlib import Path

from finetune.errors import FinetuneError

ROW = "row"  # the training rows' column that finds a row's cached teacher outputs


def load_teacher(recipe, label_names: list[str] | None):
    """The teacher as finetune.load reads it (a run folder, a model/ folder, an export or a hub id), checked to
    answer the student's task, problem and labels; one line each where it does not."""
    from finetune.loading import load_predictor

    d = recipe.distill
    try:
        teacher = load_predictor(d.teacher, device="cpu")
    except FinetuneError as error:
        raise FinetuneError(f"distill.teacher: {error}") from None
    where = f"distill.teacher: '{d.teacher}'"
    if teacher.task != recipe.task:
        raise FinetuneError(f"{where} is a {teacher.task} model, but the recipe's task is {recipe.task}; "
                            "give a teacher trained for the same task")
    if teacher.problem != recipe.head.problem:
        raise FinetuneError(f"{where} solves head.problem={teacher.problem}, the student {recipe.head.problem}; "
                            "give a teacher with the same problem")
    if list(teacher.labels or []) != list(label_names or []):
        raise FinetuneError(
            f"{where} has the labels {_shown(teacher.labels)}, the training data {_shown(label_names)}; give a "
            "teacher trained on the same label set (same names, same order)"
        )
    return teacher


def _shown(labels) -> str:
    labels = list(labels or [])
    return "(" + ", ".join(map(str, labels[:8])) + (", ..." if len(labels) > 8 else "") + ")"


def read_unlabeled(recipe) -> list:
    """distill.unlabeled's inputs as predict reads them (a text per line of a .txt, a table's text column, images
    of a folder); one line naming the file where it holds none or lacks the column."""
    from finetune.tasks import get_task

    task, path = get_task(recipe.task), recipe.distill.unlabeled
    if not Path(path).exists():  # predict's readers take any other string as an input itself: here it is a typo
        raise FinetuneError(f"distill.unlabeled: '{path}' does not exist; give a file or folder of unlabelled inputs, "
                            "or null")
    column = getattr(recipe.data, task.column_key)
    try:
        inputs = [item for _, item in task.read_inputs([path], column, recipe.data.text_pair_column)]
    except FinetuneError as error:
        raise FinetuneError(f"distill.unlabeled: {error}") from None
    if not inputs:
        raise FinetuneError(f"distill.unlabeled: '{path}' holds no inputs; give a file with a '{column}' column, a "
                            ".txt file with a text per line, or null")
    return inputs


def check_teacher(recipe, labels: list[str] | None) -> None:
    """`validate`'s look at distill: the teacher loads and fits the data's labels, the unlabeled inputs read; one
    error line where not."""
    load_teacher(recipe, labels)
    if recipe.distill.unlabeled is not None:
        read_unlabeled(recipe)


class Distiller:
    """The teacher during one run: its outputs per training row (cached once, `outputs`) or per batch (None), and
    the loss that mixes them with the labels'. Not a module of the student: LoRA, checkpoints and the export never
    see it."""

    def __init__(self, recipe, job, teacher, outputs: list | None, placeholder, device):
        from finetune.problems import get

        self.recipe, self.job, self.teacher, self.outputs = recipe, job, teacher, outputs
        self.problem = get(recipe.head.problem)
        self.placeholder = placeholder  # the label of the unlabelled rows (the KL part only); None: there are none
        self.student = job.model  # as built, before LoRA: what the task's teacher_on_batch compares inputs with
        self.device = device

    def loss(self, model, batch: dict, labels):
        """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * the problem's loss (on labelled rows only); with
        mixup or cutmix the teacher sees the mixed batch, and the labels' loss takes the mixed targets."""
        import torch

        d, t, job = self.recipe.distill, self.recipe.train, self.job
        rows = batch.pop(ROW, None)
        targets = labels
        if job.mixup is not None:
            batch["pixel_values"], targets = job.mixup(batch["pixel_values"], labels)
        logits = _logits(model(**batch))
        with torch.no_grad():
            teacher = self.teacher_logits(rows, batch, labels)
        soft = self.problem.soft_loss(logits, teacher, labels, d.temperature)
        labelled = None if self.placeholder is None else ~_is_placeholder(labels, self.placeholder)
        if labelled is not None and not bool(labelled.all()):
            logits, targets = logits[labelled], targets[labelled]
        if job.mixup is not None:
            from timm.loss import SoftTargetCrossEntropy

            hard = SoftTargetCrossEntropy()(logits.float(), targets)
        elif len(targets):
            hard = self.problem.loss(logits, targets, t.label_smoothing, job.class_weights)
        else:  # a batch of unlabelled rows only
            hard = logits.float().sum() * 0.0
        return d.alpha * soft + (1.0 - d.alpha) * hard

    def teacher_logits(self, rows, batch: dict, labels):
        """The teacher's outputs for the batch, in the student's training space: cached rows, or the teacher run on
        the batch as the student sees it."""
        from finetune.tasks import get_task

        if self.outputs is not None:
            return self.problem.soft_targets([self.outputs[int(r)] for r in rows], labels)
        raw = _logits(get_task(self.recipe.task).teacher_on_batch(self.teacher, batch, self.student))
        return self.problem.teacher_space(raw.float(), self.job.splits)


def _is_placeholder(labels, placeholder):
    """Rows whose labels are the placeholder `Problem.unlabelled` gave (NaN matching NaN)."""
    import torch

    value = torch.as_tensor(placeholder, dtype=labels.dtype, device=labels.device)
    same = labels == value
    if labels.is_floating_point():
        same |= labels.isnan() & value.isnan()
    return same.view(len(labels), -1).all(-1)


def _logits(output):
    return output.logits if hasattr(output, "logits") else output  # transformers' outputs, or a tensor


def make_distiller(recipe, job, device) -> Distiller | None:
    """distill: the teacher loaded and checked; its outputs on the training rows computed once where the task can
    (unlabelled inputs joined to the training set); what metrics.json records put in `job.record`."""
    if recipe.distill is None:
        return None
    import torch

    from finetune.problems import get
    from finetune.tasks import get_task

    started = time.perf_counter()
    splits, task = job.splits, get_task(recipe.task)
    teacher = load_teacher(recipe, splits.label_names)
    outputs = task.teacher_outputs(teacher, splits.train)
    if isinstance(teacher.model, torch.nn.Module):
        teacher.model.to(device)
        teacher.device = str(device)
    elif outputs is None:  # an ONNX session cannot run on the student's augmented tensors
        raise FinetuneError(f"distill.teacher: '{recipe.distill.teacher}' is an export, which teaches only where its "
                            "outputs are computed once per row (text, tags); give its run folder or model/ folder")
    unlabeled = read_unlabeled(recipe) if recipe.distill.unlabeled is not None else []
    labelled_rows = len(job.datasets["train"])
    problem = get(recipe.head.problem)
    placeholder = problem.unlabelled(splits.label_names) if unlabeled else None
    if unlabeled:
        if job.add_unlabeled is None:
            raise FinetuneError(f"distill.unlabeled: not supported for {recipe.task} yet; set distill.unlabeled=null")
        if job.mixup is not None:
            raise FinetuneError("distill.unlabeled: mixup and cutmix would mix the unlabelled images' placeholder "
                                "labels into real ones; set augment.mixup=0 and augment.cutmix=0")
        if recipe.train.sampler == "balanced":
            raise FinetuneError("distill.unlabeled: train.sampler=balanced draws by label, and unlabelled rows have "
                                "none; set train.sampler=random")
        # placeholder labels, left out of the labels' loss: only the teacher's soft targets teach these rows
        job.datasets["train"], table = job.add_unlabeled(job.datasets["train"], unlabeled, placeholder)
        if outputs is not None:
            outputs = outputs + task.teacher_outputs(teacher, table)
    if outputs is not None:
        outputs = [problem.teacher_space(row, splits) for row in outputs]
        job.datasets["train"] = job.datasets["train"].add_column(ROW, list(range(len(job.datasets["train"]))))
    distiller = Distiller(recipe, job, teacher, outputs, placeholder, device)
    rows = labelled_rows + len(unlabeled)
    how = "cached per row" if outputs is not None else "per batch"
    job.record["distill"] = {
        "teacher": recipe.distill.teacher, "temperature": recipe.distill.temperature, "alpha": recipe.distill.alpha,
        "teacher_outputs": how,
        "unlabeled_rows": len(unlabeled), "unlabeled_share": len(unlabeled) / rows,
        **teacher_scores(distiller),
    }
    job.notes.append(
        f"distill: teacher {recipe.distill.teacher} (its outputs {how}); {len(unlabeled)} unlabelled rows "
        f"({100 * len(unlabeled) / rows:.1f}% of training); "
        f"{time.perf_counter() - started:.1f} s"
    )
    return distiller


def teacher_scores(distiller: Distiller) -> dict:
    """{"teacher_test": metrics} (or teacher_validation where the run reads no test split): the teacher scored on
    the student's own split, beside the student's."""
    import torch

    job, recipe, problem = distiller.job, distiller.recipe, distiller.problem
    key = "test" if "test" in job.datasets and job.splits.test is not None else "validation"
    table = getattr(job.splits, key)
    batches = []
    if distiller.outputs is not None:
        from finetune.tasks import get_task

        outputs = get_task(recipe.task).teacher_outputs(distiller.teacher, table)
        labels = _label_tensor(table["label"])
        teacher = problem.soft_targets([problem.teacher_space(row, job.splits) for row in outputs], labels)
        batches.append((teacher.cpu(), labels))
    else:
        for batch in job.make_loader(job.datasets[key], recipe.train.eval_batch_size or recipe.train.batch_size,
                                     False):
            labels = batch.pop("labels")
            batch = {name: value.to(distiller.device) for name, value in batch.items()}
            with torch.no_grad():
                batches.append((distiller.teacher_logits(None, batch, labels).cpu(), labels))
    return {f"teacher_{key}": problem.score(batches, recipe.eval.metrics, job.splits, recipe.head.threshold)}


def _label_tensor(values: list):
    """Encoded labels as one tensor: word tag lists padded with the ignore index, rows of numbers stacked."""
    import torch

    from finetune.problems import IGNORE_INDEX

    if values and isinstance(values[0], list) and values[0] and isinstance(values[0][0], int):
        width = max(len(v) for v in values)
        return torch.tensor([v + [IGNORE_INDEX] * (width - len(v)) for v in values])
    return torch.tensor(values)


def card_lines(metrics: dict) -> list[str]:
    """The card's note on the teacher: which one, and its metrics beside this model's on the same split."""
    d = metrics.get("distill")
    if not d:
        return []
    key = "test" if "teacher_test" in d else "validation"
    theirs = d.get(f"teacher_{key}") or {}
    mine = metrics.get("test") if key == "test" else metrics.get("best")
    shown = ", ".join(f"{name} {value:.4f} (this model {mine[name]:.4f})" for name, value in theirs.items()
                      if name != "loss" and isinstance(mine, dict) and isinstance(mine.get(name), (int, float)))
    unlabeled = (f"; {d['unlabeled_rows']} unlabelled rows labelled by the teacher "
                 f"({100 * d['unlabeled_share']:.1f}% of training)" if d.get("unlabeled_rows") else "")
    return [f"Distilled from `{d['teacher']}` (temperature {d['temperature']}, alpha {d['alpha']}{unlabeled}). "
            f"The teacher on the same {key} split: {shown or 'no comparable metric'}.", ""]
