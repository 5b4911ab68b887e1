"""Hyperparameter sweeps on Optuna: the search space (space), the study (study), trials as ordinary runs (trials),
the sweep folder (report)."""

from finetune.sweep.trials import sweep

__all__ = ["sweep"]
