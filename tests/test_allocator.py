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
    default, kept = _probe("default"), _probe("keep")
    # 10 steps of 64 MiB: glibc's defaults fault every page in again (16k pages a step); kept, almost none
    assert default["faults"] > 10 * 8 * 2048 * 0.5, default
    assert kept["faults"] < default["faults"] / 20, (kept, default)
    assert kept["line"].startswith("memory: glibc's malloc keeps up to") and kept["again"] == kept["line"]


def test_a_malloc_setting_in_the_environment_is_left_as_it_is():
    left = _probe("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert left["line"] is None
    assert left["faults"] > 10 * 8 * 2048 * 0.5, left


def test_the_trim_threshold_fits_the_machine():
    from finetune import allocator

    assert 128 << 20 <= allocator.trim_threshold() <= 1 << 30
