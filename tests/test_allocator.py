"""finetune.allocator: after keep_freed_memory, a step's buffers come back without page faults (measured on the
process's own fault counter, in a fresh interpreter each: the setting is process-wide)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

PROBE = r"""
import json, resource, sys
import torch
from finetune import allocator
line = allocator.keep_freed_memory() if sys.argv[1] == "keep" else None

def step():  # a training step's pattern: buffers of a few MiB written, then all freed
    kept = [torch.ones(2 << 20) for _ in range(8)]  # 8 MiB each
    del kept

for _ in range(3):  # the heap grows to the step's size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"line": line, "faults": faults, "again": allocator.keep_freed_memory() if line else None}))
"""


def _probe(mode: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=environ, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_takes_a_steps_buffers_without_faulting_them_in_again():
    # glibc's own start values held fixed (its dynamic threshold moves with the sizes freed, so that a plain
    # process faults all of a step's blocks in again or only some, run to run): each block is fresh from the kernel
    fresh = _probe("keep", MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    kept = _probe("keep")
    pages = 10 * 8 * 2048  # 10 steps of 8 blocks of 8 MiB, 4 KiB pages
    assert fresh["line"] is None and fresh["faults"] > 0.9 * pages, fresh  # the environment's setting stands
    assert kept["faults"] < 0.01 * pages, kept
    assert kept["line"].startswith("memory: glibc's malloc keeps up to") and kept["again"] == kept["line"]


def test_the_trim_threshold_fits_the_machine():
    from finetune import allocator

    assert 128 << 20 <= allocator.trim_threshold() <= 1 << 30


# slow (the default suite's time): a benchmark script, run by hand and in benchmarks
@pytest.mark.slow
def test_the_allocator_benchmark_runs_both_sides_in_fresh_processes(tmp_path):
    from conftest import REPO, subprocess_env

    out = tmp_path / "allocator.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_allocator.py"), "--cases", "test_efficientnet:32:4",
                    "--steps", "2", "--warmup", "1", "--repeat", "1", "--out", str(out)],
                   check=True, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["case"] == "test_efficientnet:32:4" and row["default_ms"] > 0 and row["kept_ms"] > 0
    assert row["kept_line"].startswith("memory: glibc's malloc keeps")  # the kept side really set it
