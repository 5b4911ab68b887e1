"""The memory format and precision a convolutional model's training step runs fastest at on this CPU, measured.

Which is fastest depends on the CPU, the architecture and the batch's shape: on one AVX-512/AMX Xeon,
EfficientNet-Lite0 at 96 px trained at 74 images/s in fp32, 106 in fp32 channels_last and 76-78 in bf16 either
way (depthwise convolutions gain nothing from bf16 there); an earlier AVX2 EPYC gained nothing from channels_last.
So no rule is written down: when a run leaves the choice open (`train.precision: auto` on a CPU with native bf16,
`train.channels_last: null`), a few training steps of the recipe's own model on a batch of the run's shape time
each open candidate, and the fastest is used. The outcome is remembered per CPU, torch, threads, architecture and
shape (FINETUNE_CACHE/step-choices.json), so a machine measures a setup once; a resumed run keeps the checkpoint's
choice, so resume stays exact.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CACHE_FILE = "step-choices.json"
TIMED_ROUNDS = 2  # timed steps per option, taken in turns after every option's warm-up step
SLOW_STEP_SECONDS = 3.0  # a warm-up step this slow: one round is enough to rank the candidates


@dataclass
class StepChoice:
    precision: str  # accelerate's mixed_precision value ("no" is fp32)
    channels_last: bool
    how: str  # "measured", "remembered" (an earlier run on this machine measured it), "resumed" (the checkpoint's)
    images_per_second: dict = field(default_factory=dict)  # "fp32 contiguous" -> images/s, when measured

    def describe(self) -> str:
        from finetune.precision import name

        picked = f"{name(self.precision)} {'channels_last' if self.channels_last else 'contiguous'}"
        if self.how == "resumed":
            return f"step: {picked}, as the run was started"
        rates = ", ".join(f"{k} {v:.0f}" for k, v in self.images_per_second.items())
        seen = "measured now" if self.how == "measured" else f"measured earlier, kept in {cache_path()}"
        return f"step: {picked}, the fastest training step on this CPU ({rates} images/s; {seen})"

    def record(self) -> dict:
        from finetune.precision import name

        return {**asdict(self), "precision": name(self.precision)}


def cache_path() -> Path:
    from finetune.caches import feature_cache_dir

    return feature_cache_dir().parent / CACHE_FILE


def candidates(recipe, native_bf16: bool) -> list[tuple[str, bool]]:
    """(mixed_precision, channels_last) pairs the recipe leaves open on this CPU: one pair means nothing to choose."""
    from finetune.precision import choose_precision

    t = recipe.train
    if t.precision == "auto":
        precisions = ["no", "bf16"] if native_bf16 else ["no"]
    else:
        precisions = [choose_precision(t.precision, cuda=False, native_bf16=native_bf16)]
    layouts = [False, True] if t.channels_last is None else [bool(t.channels_last)]
    return [(p, c) for p in precisions for c in layouts]


def choose(recipe, model: torch.nn.Module, batch_shape: tuple, key: dict, native_bf16: bool) -> StepChoice | None:
    """The fastest of the open candidates for `model` (built as the run builds it, not trained) on random inputs of
    `batch_shape`; None when there is nothing to choose. `key` says what else the speed depends on (architecture,
    freezing...); the CPU, torch and threads are added here."""
    from finetune.precision import cpu_flags

    options = candidates(recipe, native_bf16)
    if len(options) < 2:
        return None
    full_key = json.dumps({**key, "shape": list(batch_shape), "cpu": _cpu_model(), "flags": cpu_flags(),
                           "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "options": [list(o) for o in options]}, sort_keys=True)
    remembered = _read_cache().get(full_key)
    if remembered is not None:
        return StepChoice(remembered["precision"], remembered["channels_last"], "remembered",
                          remembered["images_per_second"])
    rates = measure(model, batch_shape, options)
    best = max(options, key=lambda o: rates[_label(*o)])
    choice = StepChoice(best[0], best[1], "measured", rates)
    _write_cache(full_key, {"precision": best[0], "channels_last": best[1], "images_per_second": rates})
    return choice


def measure(model: torch.nn.Module, batch_shape: tuple, options: list[tuple[str, bool]]) -> dict:
    """{"fp32 contiguous": images/s, ...}: forward, loss and backward of a copy of the model per option (its weights
    are not touched: no optimizer step) on a random batch. Every option first takes a warm-up step (oneDNN builds
    its kernels then), then the options are timed in turns, TIMED_ROUNDS times, and each keeps its fastest step:
    a change in the machine's load, or the process's first steps, then hit every option alike."""
    rng = torch.random.get_rng_state()  # dropout here must not move the run's random stream
    torch.manual_seed(0)
    inputs = torch.randn(*batch_shape)
    trials = []
    try:
        for precision, channels_last in options:
            trial = copy.deepcopy(model).train()
            x = inputs
            if channels_last:
                trial = trial.to(memory_format=torch.channels_last)
                x = inputs.contiguous(memory_format=torch.channels_last)
            slow = _step_seconds(trial, x, precision) > SLOW_STEP_SECONDS  # the warm-up
            trials.append((precision, channels_last, trial, x, slow))
        best: dict = {}
        rounds = 1 if any(t[4] for t in trials) else TIMED_ROUNDS
        for _ in range(rounds):
            for precision, channels_last, trial, x, _slow in trials:
                seconds = _step_seconds(trial, x, precision)
                label = _label(precision, channels_last)
                best[label] = min(best.get(label, seconds), seconds)
    finally:
        torch.random.set_rng_state(rng)
    return {label: round(batch_shape[0] / seconds, 1) for label, seconds in best.items()}


def _step_seconds(model: torch.nn.Module, x: torch.Tensor, precision: str) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        output = model(x)
    output = output.logits if hasattr(output, "logits") else output
    output.float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def is_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's convolutions hold their weights channels_last (judged on the first whose two layouts
    differ: a 1x1 kernel on one input channel is both)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.weight.dim() == 4:
            weight = module.weight
            if weight.is_contiguous() != weight.is_contiguous(memory_format=torch.channels_last):
                return weight.is_contiguous(memory_format=torch.channels_last)
    return False


def _label(precision: str, channels_last: bool) -> str:
    from finetune.precision import name

    return f"{name(precision)} {'channels_last' if channels_last else 'contiguous'}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, value: dict) -> None:
    """Best effort (a read-only home still trains): the whole file replaced atomically."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = value
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        scratch.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(scratch, path)
    except OSError:
        pass
