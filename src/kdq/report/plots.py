"""PNG figures: confusion matrix and training curves (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kdq.io import atomic_write  # noqa: E402


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically and close it (pyplot keeps every open figure alive)."""
    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: true class), with counts in each cell when small."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(classes)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return save_figure(fig, path)


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, training against validation."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="val loss (CE)")
    acc_ax.plot(epochs, [h["train_accuracy"] for h in history], label="train")
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], label="val")
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return save_figure(fig, path)
