"""Plots of a run as PNG files: loss and metric curves, the normalised confusion matrix, per-label F1, reliability."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Each plot is drawn only when metrics.json holds what it needs: a run written by an older version, a run without a
# test split, or a regression run simply has fewer pictures.
LOSS = "loss.png"
METRICS = "metrics.png"
LEARNING_RATE = "lr.png"
CONFUSION = "confusion.png"
PER_LABEL_F1 = "per_label_f1.png"
RELIABILITY = "reliability.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and the same output on a headless server
    import matplotlib.pyplot as plt

    return plt


def write_plots(metrics: dict, directory: Path) -> dict[str, Path]:
    """Write every plot the metrics allow into directory; returns {title: path} in reading order."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for title, name, draw in (
        ("Loss", LOSS, _loss),
        ("Validation metrics", METRICS, _metric_curves),
        ("Learning rate", LEARNING_RATE, _learning_rate),
        ("Confusion matrix", CONFUSION, _confusion),
        ("F1 per label", PER_LABEL_F1, _per_label_f1),
        ("Reliability", RELIABILITY, _reliability),
    ):
        figure = draw(metrics)
        if figure is not None:
            figure.savefig(directory / name, dpi=100, bbox_inches="tight")
            _pyplot().close(figure)
            written[title] = directory / name
    return written


def evaluations(metrics: dict) -> list[dict]:
    """metrics.json's evaluations (its "epochs" entries), skipping anything malformed."""
    return [e for e in metrics.get("epochs") or [] if isinstance(e, dict) and "epoch" in e]


def _loss(metrics: dict):
    """Training loss per logged step (when metrics.json has steps) beside train and validation loss per epoch."""
    epochs, steps = evaluations(metrics), [s for s in metrics.get("steps") or [] if "loss" in s]
    if not epochs and not steps:
        return None
    plt = _pyplot()
    panels = int(bool(steps)) + int(bool(epochs))
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    axes = list(axes[0])
    if steps:
        axis = axes.pop(0)
        axis.plot([s["step"] for s in steps], [s["loss"] for s in steps], color="tab:blue")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss (one batch)")
        axis.grid(alpha=0.3)
    if epochs:
        axis = axes.pop(0)
        x, unit = evaluated_at(epochs, metrics.get("best") or {})
        axis.plot(x, [e["loss"] for e in epochs], "o-", color="tab:blue", label="train (epoch mean so far)"
                  if unit == "step" else "train (epoch mean)")
        validation = [(at, e["validation"]["loss"]) for at, e in zip(x, epochs) if "loss" in e.get("validation", {})]
        if validation:
            axis.plot(*zip(*validation), "s-", color="tab:orange", label="validation")
        axis.set_xlabel(_AXIS[unit])
        axis.set_ylabel("loss")
        _ticks(axis, x, unit)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    return figure


def _metric_curves(metrics: dict):
    epochs = evaluations(metrics)
    names = [k for k in (epochs[0].get("validation", {}) if epochs else {}) if k != "loss"]
    if not names:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    x, unit = evaluated_at(epochs, metrics.get("best") or {})
    for name in names:
        axis.plot(x, [e["validation"].get(name, np.nan) for e in epochs], "o-", label=name)
        if any("validation_ema" in e for e in epochs):
            axis.plot(x, [e.get("validation_ema", {}).get(name, np.nan) for e in epochs], "x--", label=f"{name} (EMA)")
    best = metrics.get("best", {}).get(unit)
    if best is not None:
        axis.axvline(best, color="gray", linestyle=":", label=f"kept ({unit} {best})")
    axis.set_xlabel(_AXIS[unit])
    axis.set_ylabel("validation")
    _ticks(axis, x, unit)
    axis.grid(alpha=0.3)
    axis.legend()
    return figure


_AXIS = {"epoch": "epoch", "step": "optimizer step"}


def evaluated_at(epochs: list[dict], best: dict) -> tuple[list[int], str]:
    """Where each evaluation was: its epoch, or its optimizer step for a run that validated every
    train.eval_every steps (its best names a step; several evaluations may share an epoch)."""
    by_step = "step" in best or len({e["epoch"] for e in epochs}) < len(epochs)
    if by_step and all("step" in e for e in epochs):
        return [e["step"] for e in epochs], "step"
    return [e["epoch"] for e in epochs], "epoch"


def _ticks(axis, x: list[int], unit: str) -> None:
    if unit == "epoch" or len(x) <= 12:
        axis.set_xticks(x)


def _learning_rate(metrics: dict):
    steps = [s for s in metrics.get("steps") or [] if "lr" in s]
    if len(steps) < 2:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.plot([s["step"] for s in steps], [s["lr"] for s in steps], color="tab:green")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("learning rate")
    axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axis.grid(alpha=0.3)
    return figure


def normalised_confusion(matrix) -> np.ndarray:
    """Each row (a true label) divided by its count, so a cell is the share of that label predicted as the column."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def _confusion(metrics: dict):
    confusion = metrics.get("confusion")
    if not confusion or not confusion.get("matrix"):
        return None
    labels, counts = confusion["labels"], np.asarray(confusion["matrix"])
    shares = normalised_confusion(counts)
    plt = _pyplot()
    size = min(12, 2.5 + 0.5 * len(labels))
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"{confusion.get('split', '')} (rows sum to 1)")
    if len(labels) <= 20:  # beyond that the numbers are unreadable; the colours still say it
        for i in range(len(labels)):
            for j in range(len(labels)):
                colour = "white" if shares[i, j] > 0.5 else "black"
                axis.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=8)
    return figure


def _per_label_f1(metrics: dict):
    per_label = metrics.get("per_label")
    if not per_label or not per_label.get("f1"):
        return None
    labels, f1 = per_label["labels"], per_label["f1"]
    support = per_label.get("support") or [None] * len(labels)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 1.5 + 0.35 * len(labels)))
    positions = np.arange(len(labels))
    axis.barh(positions, f1, color="tab:blue")
    axis.set_yticks(positions, [f"{name} ({n})" if n is not None else name for name, n in zip(labels, support)])
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel(f"F1 on {per_label.get('split', 'test')} (support in brackets)")
    axis.grid(axis="x", alpha=0.3)
    return figure


def _reliability(metrics: dict):
    """Accuracy against confidence per bin (finetune.calibration), before and after the temperature: a calibrated
    model's bars follow the diagonal."""
    record = (metrics.get("calibration") or {}).get("reliability")
    if not record:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    temperature = metrics["calibration"].get("temperature") or 1.0
    panels = ((axes[0], "before", "before (T = 1)"), (axes[1], "after", f"after (T = {temperature:.3g})"))
    for axis, key, title in panels:
        bins = record[key]
        width = 1.0 / len(bins["count"])
        edges = np.arange(len(bins["count"])) * width
        accuracy = [a if a is not None else 0.0 for a in bins["accuracy"]]
        axis.bar(edges, accuracy, width=width, align="edge", color="tab:blue", edgecolor="white", label="accuracy")
        confidence = [(x + width / 2, c) for x, c in zip(edges, bins["confidence"]) if c is not None]
        if confidence:
            axis.plot(*zip(*confidence), "o", color="tab:orange", markersize=4, label="mean confidence")
        axis.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel(f"confidence ({record.get('split', '')})")
        axis.set_title(title)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    return figure
