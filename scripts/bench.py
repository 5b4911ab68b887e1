#!/usr/bin/env python
"""Benchmark the kit against what a user would otherwise write: `python scripts/bench.py --help`; see bench/harness.py.

The code lives in the bench/ package beside this file: harness.py (sides, plain files, runs, checks), one worker per
side (kit_worker.py, trainer_worker.py, timm_worker.py: the baselines import nothing from finetune), flops.py and
report.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package beside this file

from bench.harness import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
