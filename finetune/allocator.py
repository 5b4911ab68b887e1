"""glibc's malloc in a CPU training run: freed memory is kept for the next step instead of going back to the kernel.

A training step allocates and frees the same activation buffers every step. glibc's defaults serve a block above the
mmap threshold (128 KiB at start, raised as blocks are freed, at most 32 MiB) with fresh pages from the kernel and hand
a freed heap top of more than 128 KiB back, so each step faults its activations in again, a page at a time, and fills
the fresh pages: `fill_` and `copy_` on new tensors (zero padding, clones) ran at a tenth of memory speed. PyTorch's
CPU tuning guide preloads jemalloc or tcmalloc for this; `mallopt` gets it from the glibc already in the process,
with no library to install and no LD_PRELOAD. Measured on a 2-core Xeon (avx512_bf16) by scripts/bench_allocator.py,
one training step: EfficientNet-Lite0 channels_last 1.05x at 96 px batch 32, 1.23x at 112 px batch 64; MiniLM-L6
1.02x fp32, 1.17x bf16. The Fashion-MNIST recipe's first 25 steps: 37-45 -> 73-79 images/s, its test pass 41-43 ->
18 s. torch's huge pages for large blocks (THP_MEM_ALLOC_ENABLE=1) cut a bare step's faults further but made that
recipe 9% slower: not set.

The process keeps at most `trim` bytes of freed memory at the top of its heap (1 GiB, or an eighth of the RAM on a
smaller machine): what a step frees, the next one takes again, so the resident size stays at the step's peak. A
process that sets any MALLOC_*_ variable of glibc's own (MALLOC_TRIM_THRESHOLD_=131072 restores the default), or that
runs on another C library, is left as it is.

It is process-wide, so only code that owns the process sets it: a training run (`finetune run`, `finetune.run`) and
the CLI's verbs that run a model. Importing finetune and `finetune.load` leave the allocator as it was.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): blocks above it are always mmapped
TOP_PAD = 64 << 20  # the heap grows by this much more than asked, so that a growing step asks the kernel less often
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_")

_kept: str | None = None  # what keep_freed_memory did in this process (it is process-wide: once is enough)


def kept() -> str | None:
    """What keep_freed_memory set in this process (its log line), or None: glibc's malloc as the process had it."""
    return _kept


def trim_threshold() -> int:
    """Freed memory kept at the heap's top: 1 GiB, or an eighth of the RAM where that is less (at least 128 MiB)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return max(128 << 20, min(1 << 30, ram // 8))


def keep_freed_memory() -> str | None:
    """Set glibc's malloc to keep freed memory for reuse (see the module's doc). Returns the line for the run's log,
    or None where nothing was set: not glibc, or the process's environment already sets glibc's malloc."""
    global _kept
    if _kept is not None:
        return _kept
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(name in os.environ for name in _USER_SETTINGS):
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = trim_threshold()
    done = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, trim), (_M_TOP_PAD, TOP_PAD)))
    if not done:
        return None
    _kept = (f"memory: glibc's malloc keeps up to {trim >> 20} MiB freed for the next step (blocks to "
             f"{MMAP_THRESHOLD >> 20} MiB from its heap): a step's activations reuse the pages the last one freed")
    return _kept
