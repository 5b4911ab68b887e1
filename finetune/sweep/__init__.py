"""Hyperparameter sweeps on Optuna: the search space (space), the study (study), trials as ordinary runs and the
`finetune sweep` entry (trials), the sweep folder (report)."""
