"""Plots: which PNGs a metrics.json gives, that they are real images, and the normalised confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finetune.plots import normalised_confusion, write_plots

EPOCHS = [
    {"epoch": 1, "loss": 1.1, "validation": {"loss": 1.0, "accuracy": 0.5, "f1_macro": 0.4}},
    {"epoch": 2, "loss": 0.7, "validation": {"loss": 0.8, "accuracy": 0.7, "f1_macro": 0.6}},
    {"epoch": 3, "loss": 0.4, "validation": {"loss": 0.9, "accuracy": 0.6, "f1_macro": 0.6}},
]
STEPS = [{"step": s, "loss": 1.2 / (1 + s / 30), "lr": 1e-3 * min(1.0, s / 20)} for s in range(10, 100, 10)]
CONFUSION = {"split": "test", "labels": ["food", "sports", "tech"], "matrix": [[3, 1, 0], [0, 2, 2], [0, 0, 0]]}


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_a_single_label_run_gets_curves_and_the_confusion_matrix(tmp_path):
    metrics = {"epochs": EPOCHS, "steps": STEPS, "best": {"epoch": 2, "accuracy": 0.7}, "confusion": CONFUSION}
    written = write_plots(metrics, tmp_path / "plots")
    assert list(written) == ["Loss", "Validation metrics", "Learning rate", "Confusion matrix"]
    for path in written.values():
        pixels = read_png(path)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 10  # something was drawn, not a blank canvas


def test_a_multi_label_run_gets_per_label_f1(tmp_path):
    per_label = {"split": "test", "labels": ["a", "b"], "f1": [0.5, 0.9], "support": [4, 6]}
    written = write_plots({"epochs": EPOCHS, "per_label": per_label}, tmp_path)
    assert list(written) == ["Loss", "Validation metrics", "F1 per label"]


def test_missing_keys_skip_their_plots(tmp_path):
    """An older metrics.json (no steps, no confusion) or a regression run simply has fewer pictures."""
    assert list(write_plots({"epochs": EPOCHS[:1]}, tmp_path)) == ["Loss", "Validation metrics"]
    assert write_plots({}, tmp_path / "empty") == {}
    regression = [{"epoch": 1, "loss": 0.3, "validation": {"loss": 0.2, "rmse": 1.5}}]
    assert list(write_plots({"epochs": regression, "steps": STEPS[:1]}, tmp_path / "r")) == [
        "Loss", "Validation metrics"
    ]


def test_the_confusion_matrix_is_normalised_per_true_label():
    shares = normalised_confusion(CONFUSION["matrix"])
    assert shares[0] == pytest.approx([0.75, 0.25, 0.0])
    assert shares[1] == pytest.approx([0.0, 0.5, 0.5])
    assert shares[2] == pytest.approx([0.0, 0.0, 0.0])  # a label absent from the split: a zero row, not NaN
