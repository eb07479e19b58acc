"""PNG figures of one run: confusion matrix and training curves, each loss term its own line
(matplotlib, no display needed); also the pieces the comparison figures (figures.py) reuse, so a
confusion matrix or a loss curve is drawn by one piece of code wherever it appears."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kdq.errors import KdqError  # noqa: E402
from kdq.io import atomic_write  # noqa: E402

# Line styles telling loss terms apart where colour already tells runs (or train/val) apart.
TERM_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)))


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically and close it (pyplot keeps every open figure alive)."""
    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)


def draw_confusion(ax: Axes, matrix: list[list[int]], classes: list[str], *, normalise: bool = True,
                   text: str = "counts") -> None:
    """Draw a confusion matrix (rows: true class) on `ax`; the one drawing behind every confusion figure.

    normalise=True colours each cell by its share of the true class's images (row-normalised),
    so a rare class reads as clearly as a common one; normalise=False colours by raw counts.
    `text` writes "counts" or row "fractions" in the cells (only up to 20 classes, where they fit).
    """
    import numpy as np

    if text not in ("counts", "fractions"):
        raise KdqError(f"confusion cell text must be 'counts' or 'fractions', got {text!r}")
    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    shade = norm if normalise else m / max(float(m.max(initial=0.0)), 1.0)
    n = len(classes)
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    cell = f"{int(m[i, j])}" if text == "counts" else f"{norm[i, j]:.2f}"
                    ax.text(j, i, cell, ha="center", va="center", fontsize=6,
                            color="white" if shade[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")


def confusion_size(classes: int) -> float:
    """Side in inches of one confusion panel: room for named cells up to 20 classes; capped
    beyond, where cells carry no text (100 classes would otherwise make a 5000-pixel image)."""
    return min(max(4.0, 0.45 * classes + 2), 11.0)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: true class), with counts in each cell when small."""
    size = confusion_size(len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    draw_confusion(ax, matrix, classes, normalise=True, text="counts")
    ax.set_title(title or "confusion matrix")
    return save_figure(fig, path)


def finite_float(value: Any) -> float | None:
    """`value` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def loss_series(history: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """The training-loss lines of a history: {term: (epochs, values)}, "total" first.

    "total" is train_loss (what the optimiser minimised); every other train_<term> that is a
    loss (not train_accuracy) is its own line named <term>: kd, ce, tckd, hint, ... A term equal
    to the total at every epoch (train_ce of a plain cross-entropy run) is left out: it would
    only hide under the total. Points whose epoch or value is missing or not finite are skipped.
    """
    names = ["train_loss"] + sorted({k for h in history if isinstance(h, Mapping) for k in h
                                     if isinstance(k, str) and k.startswith("train_")
                                     and k not in ("train_loss", "train_accuracy")})
    series: dict[str, tuple[list[float], list[float]]] = {}
    for key in names:
        epochs, values = [], []
        for h in history:
            if not isinstance(h, Mapping):
                continue
            epoch, value = finite_float(h.get("epoch")), finite_float(h.get(key))
            if epoch is not None and value is not None:
                epochs.append(epoch)
                values.append(value)
        if values:
            series["total" if key == "train_loss" else key[len("train_"):]] = (epochs, values)
    total = series.get("total")
    return {name: line for name, line in series.items() if name == "total" or line != total}


def history_series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one metric of a history, skipping epochs where it is missing or not finite."""
    points = [(finite_float(h.get("epoch")), finite_float(h.get(key))) for h in history if isinstance(h, Mapping)]
    kept = [(e, v) for e, v in points if e is not None and v is not None]
    return [e for e, _ in kept], [v for _, v in kept]


def epoch_axis(ax: Axes) -> None:
    """Label x as epochs, with whole-number ticks only (a short run otherwise shows 1.25, 1.5, ...)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def loss_scale(ax: Axes, values: Sequence[float]) -> str:
    """Scale a loss axis and return its y label: logarithmic when the values are all positive
    and span more than 50x (a weighted total of 20 beside a feature term of 0.01), so every
    term stays readable."""
    if values and min(values) > 0 and max(values) / min(values) > 50:
        ax.set_yscale("log")
        return "loss (log scale)"
    return "loss"


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy per epoch: each loss term its own line (total, kd, ce, ...) beside
    the validation loss; training against validation accuracy."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    series = loss_series(history)
    terms = [t for t in series if t != "total"]
    for term, (epochs, values) in series.items():
        # the total is solid and on top; each term has its own colour and a dashed style
        style = "-" if term == "total" else TERM_STYLES[terms.index(term) % len(TERM_STYLES)]
        loss_ax.plot(epochs, values, linestyle=style, label="train loss" if term == "total" else f"train {term}",
                     zorder=3 if term == "total" else 2)
    val_epochs, val_loss = history_series(history, "val_loss")
    if val_loss:
        loss_ax.plot(val_epochs, val_loss, color="black", linewidth=1, label="val loss (CE)")
    for key, name in (("train_accuracy", "train"), ("val_accuracy", "val")):
        epochs, values = history_series(history, key)
        if values:
            acc_ax.plot(epochs, values, label=name)
    loss_name = loss_scale(loss_ax, [v for _, values in series.values() for v in values] + val_loss)
    for ax, name in ((loss_ax, loss_name), (acc_ax, "accuracy")):
        epoch_axis(ax)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)
