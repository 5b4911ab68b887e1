"""Tasks: one module per task (its inputs, preprocessing, model, metrics and outputs)."""
