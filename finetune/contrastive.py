"""The contrastive stage (SetFit's first, `contrastive:`): label pairs drawn from the training rows, the backbone tuned
so that the embeddings the head reads are as alike as the pairs' labels, and its own checkpoints for exact resume.

torch is imported inside the functions: loading a recipe checks `contrastive:` here without loading torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from finetune.errors import FinetuneError

PREFIX = "contrastive-"  # checkpoints/contrastive-<step>: beside the head stage's step-<step> folders
TEMPERATURE = 0.07  # SupConLoss's (SetFit's default), for the cosines of unit embeddings
WARMUP = 0.1  # share of the steps the lr warms up over, as SetFit's warmup_proportion
MARGIN_ROWS = 512  # rows the class margin of the log line is measured on


def check_recipe(recipe, need) -> None:
    """contrastive.*: sizes and rate, a task that pairs its inputs, a problem with labels to pair by."""
    from finetune.problems import get
    from finetune.tasks import TASKS, get_task

    c = recipe.contrastive
    if c is None:
        return
    need(c.pairs >= 2, f"contrastive.pairs: at least 2 per row (one of its class, one of another); got {c.pairs}")
    need(c.epochs >= 1, f"contrastive.epochs: must be at least 1, got {c.epochs}")
    need(c.lr > 0, f"contrastive.lr: must be > 0, got {c.lr}")
    need(c.batch_size >= 1, f"contrastive.batch_size: must be at least 1, got {c.batch_size}")
    if recipe.task in TASKS:  # a bad task name is reported already
        need(get_task(recipe.task).contrastive_applies,
             f"contrastive: tunes a backbone on pairs of labelled texts; {recipe.task} does not take it "
             "(set contrastive=null)")
    refusal = get(recipe.head.problem).few_label_refusal()
    need(refusal is None, f"contrastive: {refusal}; set contrastive=null")


def card_note(recipe) -> str:
    """The card's sentence on the stage, when the run had one."""
    c = recipe.contrastive
    if c is None:
        return ""
    loss = "a cosine-similarity loss" if c.loss == "cosine" else "a supervised contrastive loss"
    return (f" Before the head trained, the backbone was tuned contrastively (SetFit's first stage: {c.pairs} label "
            f"pairs per training row, {loss}, {c.epochs} epoch(s)).")


def draw_pairs(labels, problem, per_row: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left, right, target) row positions and targets: for each row, half its pairs (rounded up) with rows of its
    class (label similarity > 0; itself only when no other row has it) and half with rows of other classes
    (similarity 0), without replacement where there are enough; the target is the problem's label similarity."""
    rng = np.random.RandomState(seed)
    same_share = (per_row + 1) // 2
    left, right, target = [], [], []
    for start in range(0, len(labels), 256):  # 256 rows at a time: a similarity matrix of every row is n^2
        block = problem.label_similarity(labels[start:start + 256], labels).numpy()
        for offset, row in enumerate(block):
            i = start + offset
            same = np.flatnonzero(row > 0)
            same = same[same != i] if len(same) > 1 else same
            for pool, k in ((same, same_share), (np.flatnonzero(row == 0), per_row - same_share)):
                if len(pool) and k:
                    chosen = rng.choice(pool, k, replace=len(pool) < k)
                    left += [i] * k
                    right += chosen.tolist()
                    target += row[chosen].tolist()
    return np.asarray(left), np.asarray(right), np.asarray(target, dtype=np.float32)


def cosine_loss(embeddings, targets):
    """sentence-transformers' CosineSimilarityLoss: MSE between cos(u, v) and the target; u, v the two halves."""
    import torch.nn.functional as F

    u, v = embeddings.float().chunk(2)
    return F.mse_loss(F.cosine_similarity(u, v), targets)


def supcon_loss(embeddings, similarity):
    """SetFit's SupConLoss with one view per row: each row's positives (weighted by label similarity) against every
    other row of the batch; rows without a positive in the batch are left out (SetFit's would divide by zero)."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(embeddings.float(), dim=1)
    itself = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = (z @ z.T / TEMPERATURE).masked_fill(itself, float("-inf"))
    log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).masked_fill(itself, 0.0)
    weights = similarity.masked_fill(itself, 0.0)
    total = weights.sum(1)
    has = total > 0
    if not has.any():  # no row has a positive in this batch: nothing to pull together (and no nan)
        return (weights * log_prob).sum() * 0.0
    return (-(weights * log_prob).sum(1)[has] / total[has]).mean()


class Stage:
    """The stage's state: the pairs, the tuned weights (the backbone's, or its LoRA adapters), AdamW, the schedule,
    and where it stands (a step count; each epoch's order is a function of the seed and the epoch alone)."""

    def __init__(self, job, recipe, accelerator):
        import torch
        from transformers import get_linear_schedule_with_warmup

        from finetune import optim, precision, problems, transfer
        from finetune.model import interface_of

        c, t = recipe.contrastive, recipe.train
        self.recipe, self.device, self.mixed = recipe, accelerator.device, accelerator.mixed_precision
        self.model = job.model.to(self.device)
        self.view = interface_of(transfer.unwrap_lora(self.model))
        if not self.view.separable_head():
            raise FinetuneError(f"contrastive: the head of {type(self.model).__name__} reads the backbone inside "
                                "transformers' own class, so its embedding cannot be tuned apart; "
                                "set head.pooling=mean")
        dataset = job.datasets["train"]
        self.columns = {k: dataset[k][:] for k in ("input_ids", "attention_mask", "token_type_ids")
                        if k in dataset.column_names}
        self.pad = getattr(self.view.library_model().config, "pad_token_id", None) or 0
        self.problem = problems.get(recipe.head.problem)
        self.labels = torch.tensor(transfer.labels_of(dataset))
        self.left, self.right, self.target = draw_pairs(self.labels, self.problem, c.pairs, t.seed)
        head = transfer.optimizer_head_names(self.model)
        groups = optim.build_param_groups(self.model, c.lr, None, t.weight_decay, head)
        groups = [g for g in groups if not g["name"].startswith("head")]  # the head is not in the embedding
        self.named = {n: p for n, p in self.model.named_parameters() if p.requires_grad and n not in head}
        self.optimizer = torch.optim.AdamW(groups, fused=True)  # one kernel for all tensors, as the head stage's
        self.per_epoch = math.ceil(len(self.left) / c.batch_size)
        self.steps = self.per_epoch * c.epochs
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, math.ceil(WARMUP * self.steps), self.steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.mixed == "fp16")
        self.autocast = lambda: precision.autocast(self.device, self.mixed)
        self.step, self.seconds, self.before = 0, 0.0, None
        self.loss_sum = torch.zeros((), device=self.device)  # summed on the device: no host sync per step

    def batches(self, epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s batches of pair positions, length-grouped (pairs of short texts pad to little)."""
        from finetune.sampling import LengthGroupedSampler

        ids = self.columns["input_ids"]
        lengths = [max(len(ids[a]), len(ids[b])) for a, b in zip(self.left, self.right)]
        size = self.recipe.contrastive.batch_size
        sampler = LengthGroupedSampler(lengths, size, self.recipe.train.seed)
        sampler.set_epoch(epoch)
        order = list(sampler)
        return [order[i:i + size] for i in range(0, len(order), size)]

    def inputs(self, rows: list[int]) -> dict:
        """The rows' token columns padded (on the right) to the longest of them, on the device."""
        import torch

        longest = max(len(self.columns["input_ids"][r]) for r in rows)
        return {
            key: torch.tensor([values[r] + [self.pad if key == "input_ids" else 0] * (longest - len(values[r]))
                               for r in rows], device=self.device)
            for key, values in self.columns.items()
        }

    def embed(self, rows: list[int]):
        with self.autocast():
            return self.view.features(self.inputs(rows))

    def train_step(self, pairs: list[int]):
        """One batch of pairs: both sides embedded in one pass, the loss, backward, clipping, AdamW, the schedule."""
        import torch

        left, right = self.left[pairs].tolist(), self.right[pairs].tolist()
        embeddings = self.embed(left + right)
        if self.recipe.contrastive.loss == "cosine":
            loss = cosine_loss(embeddings, torch.from_numpy(self.target[pairs]).to(self.device))
        else:
            rows = torch.tensor(left + right)
            loss = supcon_loss(embeddings, self.problem.label_similarity(self.labels[rows], self.labels[rows])
                               .to(self.device))
        self.scaler.scale(loss).backward()
        if self.recipe.train.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(list(self.named.values()), self.recipe.train.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def margin(self) -> float:
        """Mean cosine of same-class row pairs minus that of different-class ones (on up to MARGIN_ROWS rows)."""
        import torch
        import torch.nn.functional as F

        rows = list(range(min(len(self.labels), MARGIN_ROWS)))
        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            z = F.normalize(torch.cat([self.embed(rows[i:i + 64]).float() for i in range(0, len(rows), 64)]), dim=1)
        self.model.train(was)
        cosines = (z @ z.T).cpu()
        similarity = self.problem.label_similarity(self.labels[rows], self.labels[rows])
        off = ~torch.eye(len(rows), dtype=torch.bool)
        same, other = (similarity > 0) & off, (similarity == 0) & off
        if not same.any() or not other.any():
            return 0.0
        return float(cosines[same].mean() - cosines[other].mean())

    # checkpoints

    def save(self, root: Path, done: bool, record: dict | None = None) -> None:
        """checkpoints/contrastive-<step>, written under a temporary name and renamed into place: the tuned weights,
        the RNG, and (until the stage is done) AdamW, the schedule and the scaler."""
        import torch
        from safetensors.torch import save_file

        folder = root / f"{PREFIX}{self.step:08d}"
        temporary = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in self.named.items()}, temporary / "weights.safetensors")
        state = {"rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if not done:
            state |= {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                      "scaler": self.scaler.state_dict()}
        torch.save(state, temporary / "state.pt")
        progress = {"stage": "contrastive", "step": self.step, "steps": self.steps, "done": done,
                    "loss_sum": float(self.loss_sum), "seconds": self.seconds, "margin_before": self.before,
                    "record": record}
        (temporary / "progress.json").write_text(json.dumps(progress) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(temporary, folder)
        for old in checkpoints(root)[:-self.recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, folder: Path) -> dict:
        """Back to a checkpoint's point (weights from safetensors, the rest with weights_only); its progress."""
        import torch
        from safetensors.torch import load_file

        weights = load_file(folder / "weights.safetensors")
        with torch.no_grad():
            for name, param in self.named.items():
                param.copy_(weights[name])
        state = torch.load(folder / "state.pt", weights_only=True)
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        progress = json.loads((folder / "progress.json").read_text())
        self.step, self.seconds, self.before = progress["step"], progress["seconds"], progress["margin_before"]
        self.loss_sum = torch.tensor(progress["loss_sum"], device=self.device)
        return progress


def checkpoints(root: Path) -> list[Path]:
    """The stage's complete checkpoints, oldest first (a temporary folder a kill left behind is not one)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / "progress.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def tune(job, recipe, accelerator, say, resume: bool, save: bool = True, stop=None) -> dict | None:
    """The stage, when the recipe asks for it, on job.model in place (LoRA: its adapters); None without it.

    resume: continue from the stage's newest checkpoint (or skip the stage when it finished). save: false writes no
    checkpoint (a sweep's trial). stop: the loop's Ctrl-C/SIGTERM handler (a context with `.requested`): in one
    process, the stage then stops at a step boundary with a checkpoint. Returns metrics.json's record of it
    (train.contrastive)."""
    if recipe.contrastive is None:
        return None
    from finetune.dropout import use_fast_dropout

    if accelerator.device.type == "cpu" and recipe.train.fast_dropout:
        use_fast_dropout(job.model)  # ~40% of a CPU text forward pass otherwise
    stage = Stage(job, recipe, accelerator)
    root = Path(recipe.output.dir) / "checkpoints"
    kept = checkpoints(root)[-1] if resume and checkpoints(root) else None
    progress = stage.load(kept) if kept is not None else None
    if progress is not None and progress["done"]:
        say(f"contrastive stage: done before the resume ({kept})")
        return progress["record"]
    if progress is not None:
        say(f"contrastive stage: resumed from {kept} at step {stage.step}")
    stop = stop if accelerator.num_processes == 1 else None
    with stop if stop is not None else contextlib.nullcontext():
        return run_stage(stage, say, root if save and accelerator.is_main_process else None,
                   not accelerator.is_local_main_process, stop)


def run_stage(stage: Stage, say, root: Path | None, quiet: bool = False, stop=None) -> dict:
    """The stage's steps from where it stands to its end; checkpoints (when `root`) every train.checkpoint_every
    steps, at a requested stop and at the end. Returns its record."""
    from finetune.progress import epoch_progress

    c, every = stage.recipe.contrastive, stage.recipe.train.checkpoint_every
    same = int((stage.target > 0).sum())
    say(f"contrastive stage: {len(stage.left)} pairs ({same} of one class) of {len(stage.labels)} rows, "
        f"{stage.steps} steps of {c.batch_size} pairs, {c.loss} loss")
    if stage.before is None:
        stage.before = stage.margin()
    stage.model.train()
    while stage.step < stage.steps:
        epoch, done_in_epoch = divmod(stage.step, stage.per_epoch)
        batches = stage.batches(epoch)[done_in_epoch:]
        bar = epoch_progress(batches, f"contrastive {epoch + 1}/{c.epochs}", quiet, done_in_epoch, stage.per_epoch)
        start = time.perf_counter()
        for pairs in bar:
            stage.loss_sum += stage.train_step(pairs)
            stage.step += 1
            stopping = stop is not None and stop.requested
            periodic = every is not None and stage.step % every == 0 and stage.step < stage.steps
            if root is not None and (periodic or stopping):
                stage.seconds += time.perf_counter() - start
                _refuse_a_non_finite_loss(stage)
                stage.save(root, done=False)
                start = time.perf_counter()
            if stopping:
                if root is not None:
                    config = Path(stage.recipe.output.dir) / "config.yaml"
                    say(f"interrupted in the contrastive stage at step {stage.step}: finetune run {config} --resume")
                raise KeyboardInterrupt
        stage.seconds += time.perf_counter() - start
    _refuse_a_non_finite_loss(stage)
    record = {"pairs": len(stage.left), "steps": stage.steps, "loss": float(stage.loss_sum) / max(stage.steps, 1),
              "seconds": stage.seconds, "margin_before": stage.before, "margin_after": stage.margin()}
    say(f"contrastive stage: mean loss {record['loss']:.4f}; class margin of the embeddings (same-class minus "
        f"other-class cosine) {stage.before:.3f} -> {record['margin_after']:.3f}; {stage.seconds:.1f}s")
    if root is not None:
        stage.save(root, done=True, record=record)
    return record


def _refuse_a_non_finite_loss(stage: Stage) -> None:
    if not math.isfinite(float(stage.loss_sum)):
        raise FinetuneError(f"contrastive: the loss is not finite (by step {stage.step}); lower contrastive.lr")
