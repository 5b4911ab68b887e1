"""The benchmark: the kit against the transformers Trainer and a plain timm loop, on the same rows (see harness)."""

from bench.report import write_markdown  # noqa: F401  (profile_step.py writes its tables with it)
