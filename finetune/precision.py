"""Numeric precision: what the CPU computes natively, the choice behind train.precision, and autocast for inference.

A CPU with native bf16 (x86 AVX512_BF16 or AMX-BF16; Arm BF16 or SVE-BF16) runs bf16 matmuls at several times its
fp32 rate, and MiniLM's training step under bf16 autocast at 1.3-1.75x the fp32 step. Without it (AVX2 only) torch
falls back to scalar bf16 kernels about 400x slower than fp32. The choice is made from the CPU's own feature flags
(torch.cpu.get_capabilities, read once by cpuinfo): they are exact, so no micro-benchmark is needed.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

from finetune.errors import FinetuneError

# x86: AVX512_BF16 (Cooper Lake, Zen 4 on) and AMX-BF16 (Sapphire Rapids on); Arm: the BF16 and SVE-BF16 extensions
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
# the flags that decide CPU speed, as benchmarks print them beside a figure (figures from different CPUs differ)
SPEED_FLAGS = ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "neon", "bf16", "sve")


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> dict:
    """The CPU's feature flags as torch detects them (empty where this torch cannot say)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return dict(get())
    return {name: bool(getattr(torch.cpu, f"_is_{name}_supported", lambda: False)())
            for name in ("avx2", "avx512", "avx512_bf16", "amx_tile", "vnni")}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (the seam tests patch to play either kind of CPU)."""
    capabilities = cpu_capabilities()
    return any(capabilities.get(flag) is True for flag in NATIVE_BF16_FLAGS)


def cpu_flags() -> str:
    """The speed-deciding flags of this CPU in one line, e.g. "x86_64 AVX2 AVX512_F AVX512_BF16 AMX_BF16"."""
    capabilities = cpu_capabilities()
    found = [flag.upper() for flag in SPEED_FLAGS if capabilities.get(flag) is True]
    return " ".join([str(capabilities.get("architecture", "")), *found]).strip() or "unknown CPU"


def choose_precision(requested: str, cuda: bool | None = None, native_bf16: bool | None = None,
                     resumed: str | None = None) -> str:
    """Accelerate's mixed_precision value for train.precision: `auto` is bf16/fp16 on GPUs, bf16 on CPUs that
    compute it natively and fp32 (no) on the others; bf16 asked of a CPU without it is refused.

    resumed: the value the resumed run trained at (`of_checkpoint`); `auto` keeps it, so resume stays exact.
    """
    asked = "train.precision:"
    if requested == "auto" and resumed is not None:
        requested, asked = name(resumed), "--resume: the run trained at"
    if requested == "fp32":
        return "no"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested
    if requested == "fp16":
        raise FinetuneError("train.precision: fp16 needs a GPU; use fp32 (or auto) on this machine")
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    if requested == "auto":
        return "bf16" if native else "no"
    if not native:  # requested == "bf16"
        raise FinetuneError(
            f"{asked} bf16, which this CPU ({cpu_flags()}: no AVX512_BF16 or AMX) runs about 400x slower than "
            "fp32; use train.precision=fp32 (or auto), or a CPU with native bf16"
        )
    return "bf16"


def of_checkpoint(checkpoint: Path | None, key: str = "precision"):
    """What a run's checkpoint says it trained at: `key` of its progress.json (precision: the mixed_precision
    value; channels_last: the memory format). None: no checkpoint, or one that predates the key."""
    if checkpoint is None:
        return None
    try:
        value = json.loads((Path(checkpoint) / "progress.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return None if value == "" else value


def describe(mixed_precision: str, requested: str) -> str:
    """One log line: the precision training runs at, and why."""
    if torch.cuda.is_available():
        return f"precision {name(mixed_precision)} (train.precision {requested}, on a GPU)"
    native = "computes bf16 natively" if cpu_has_native_bf16() else "has no native bf16"
    how = "bf16 autocast, fp32 weights and optimizer" if mixed_precision == "bf16" else "fp32"
    return f"precision {how} (train.precision {requested}; this CPU {native}: {cpu_flags()})"


def name(mixed_precision: str) -> str:
    """The recipe's word for accelerate's value ("no" is fp32), as the log and metrics.json say it."""
    return {"no": "fp32"}.get(mixed_precision, mixed_precision)


def autocast(device: str | torch.device, precision: str):
    """The context a forward pass runs in at `precision` ("bf16", "fp16"; fp32/"no": none)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def for_inference(run_dir: Path | None, device: str) -> str:
    """The precision to predict at: the run's own (metrics.json's train.precision) where this device still computes
    it natively, else fp32 (a bf16 run predicts in fp32 on an AVX2 CPU: a little more exact, and fast)."""
    if run_dir is None or not (Path(run_dir) / "metrics.json").is_file():
        return "fp32"
    try:
        trained = json.loads((Path(run_dir) / "metrics.json").read_text()).get("train", {}).get("precision", "fp32")
    except (OSError, ValueError, AttributeError):
        return "fp32"
    if trained == "bf16" and (torch.device(device).type != "cpu" or cpu_has_native_bf16()):
        return "bf16"
    if trained == "fp16" and torch.device(device).type == "cuda":
        return "fp16"
    return "fp32"


def allow_accelerator_at(mixed_precision: str) -> None:
    """Let this process's next Accelerator take `mixed_precision`: accelerate keeps one state per process and refuses
    another precision in a later run (a test, a sweep trial, the Python API) unless that state is cleared first."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state()  # not PartialState's: the process group, if any, stays
