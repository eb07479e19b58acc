"""Low-bit sweep report: accuracy and size of each recipe at each bit width, over seeds.

A sweep is a list of plain result rows, one per trained model:

    {"recipe": "apprentice", "bits": "w4a4", "seed": 0, "accuracy": 0.9012,
     "size_bytes": 183000, "float_size_bytes": 1100000}

`float_size_bytes` (the float32 model on disk) and `size_bytes` are optional; `accuracy`
is a fraction in [0, 1]. The functions here group rows by (recipe, bits), reduce the seeds
to mean and sample std, and write Markdown tables and one PNG figure.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Headless: kdq/report/__init__.py imports plots (which selects Agg) before this module.
import matplotlib.pyplot as plt
from matplotlib.ticker import NullLocator

from kdq.errors import KdqError
from kdq.report.plots import save_figure
from kdq.report.table import human_bytes, markdown_table

# The scheme grammar of kdq.quant.lowbit.LowBitConfig.parse, repeated so that reporting
# needs no torch import. w32 is allowed here so a float baseline can sit in the same sweep.
_SCHEME = re.compile(r"w(\d+)(?:a(\d+))?", re.IGNORECASE)
_MAX_BITS = 32
_FLOAT_BITS = 32
# size_table's allowance over the ideal k/32 size: scales, zero points and file headers.
_BOUND_SLACK = 1.10
_EMPTY = "no sweep results to report; pass rows such as {'recipe': 'qkd', 'bits': 'w4a4', 'accuracy': 0.91}"


def _parse(scheme: Any) -> tuple[int, int]:
    """(weight bits, activation bits) of a scheme; float activations count as 32."""
    match = _SCHEME.fullmatch(scheme.strip()) if isinstance(scheme, str) else None
    if match is None:
        raise KdqError(f"cannot read bit-width scheme {scheme!r}; write w<bits>a<bits> such as w4a4, w1a2, w2a32 or w2 (a32 or no a: float activations)")
    w, a = int(match[1]), _FLOAT_BITS if match[2] is None else int(match[2])
    if not (1 <= w <= _MAX_BITS and 1 <= a <= _MAX_BITS):
        raise KdqError(f"bit widths in scheme {scheme!r} must be from 1 to {_MAX_BITS}, as in w4a4 or w1a2")
    return w, a


def weight_bits(scheme: str) -> int:
    """The weight bit width of a scheme: "w4a4" -> 4, "w1a2" -> 1, "w2" -> 2."""
    return _parse(scheme)[0]


def _precision_key(scheme: str) -> tuple[int, int]:
    """Sort key putting high precision first: by weight bits, then activation bits."""
    w, a = _parse(scheme)
    return -w, -a


def _check_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as a list, each checked so that a bad one is named by its index."""
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise KdqError(f"sweep row {i} must be a dict with recipe, bits and accuracy, got {type(row).__name__}")
        missing = [k for k in ("recipe", "bits", "accuracy") if k not in row]
        if missing:
            raise KdqError(f"sweep row {i} lacks {', '.join(missing)}; each row needs recipe, bits and accuracy")
        try:
            _parse(row["bits"])
        except KdqError as e:
            raise KdqError(f"sweep row {i}: {e}") from None
        acc = row["accuracy"]
        if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0.0 <= acc <= 1.0:
            raise KdqError(f"sweep row {i}: accuracy must be a fraction in [0, 1], got {acc!r} (divide percentages by 100)")
    return rows


def _mean_of(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    """Mean of `key` over the rows that have it; None when none do."""
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def summarize_sweep(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (recipe, bits): recipes in first-seen order, then high precision first.

    Keys: recipe, bits, weight_bits, seeds, mean, std (sample std, ddof=1; 0.0 for one
    seed), min, max, size_bytes and float_size_bytes (means, None when absent), accuracies.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in _check_rows(rows):
        groups.setdefault((row["recipe"], row["bits"]), []).append(row)
    order = {recipe: i for i, recipe in enumerate(dict.fromkeys(recipe for recipe, _ in groups))}
    keys = sorted(groups, key=lambda k: (order[k[0]], *_precision_key(k[1])))
    out = []
    for recipe, bits in keys:
        group = groups[(recipe, bits)]
        acc = [float(r["accuracy"]) for r in group]
        out.append({
            "recipe": recipe,
            "bits": bits,
            "weight_bits": weight_bits(bits),
            "seeds": len(acc),
            "mean": statistics.fmean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "min": min(acc),
            "max": max(acc),
            "size_bytes": _mean_of(group, "size_bytes"),
            "float_size_bytes": _mean_of(group, "float_size_bytes"),
            "accuracies": acc,
        })
    return out


def _check_reference(reference: float | None) -> None:
    if reference is not None and (isinstance(reference, bool) or not isinstance(reference, (int, float)) or not 0.0 <= reference <= 1.0):
        raise KdqError(f"reference must be the float model's accuracy as a fraction in [0, 1], got {reference!r}")


def _accuracy_cell(s: dict[str, Any]) -> str:
    return f"{s['mean']:.4f}" if s["seeds"] == 1 else f"{s['mean']:.4f} ± {s['std']:.4f}"


def _delta_cell(mean: float, reference: float) -> str:
    points = round((mean - reference) * 100, 2)
    return f"{points + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0, so a tie reads "+0.00"


def sweep_table(rows: Iterable[dict[str, Any]], reference: float | None = None) -> str:
    """Markdown table, one line per (recipe, bits): accuracy as mean ± std over seeds.

    With `reference` (the float model's accuracy) a column gives the change in percentage
    points; with float_size_bytes in the rows a column gives the size as a fraction of float.
    """
    _check_reference(reference)
    summary = summarize_sweep(rows)
    if not summary:
        raise KdqError(_EMPTY)
    columns = [("recipe", "recipe"), ("bits", "bits"), ("seeds", "seeds"), ("accuracy", "accuracy")]
    if reference is not None:
        columns.append(("delta", "Δ vs float (points)"))
    columns.append(("size", "size"))
    if any(s["float_size_bytes"] for s in summary):
        columns.append(("fraction", "of float"))
    table = []
    for s in summary:
        size, full = s["size_bytes"], s["float_size_bytes"]
        table.append({
            "recipe": s["recipe"],
            "bits": s["bits"],
            "seeds": s["seeds"],
            "accuracy": _accuracy_cell(s),
            "delta": _delta_cell(s["mean"], reference) if reference is not None else "",
            "size": human_bytes(size) if size is not None else "-",
            "fraction": f"1/{full / size:.1f} of float" if size and full else "-",
        })
    return markdown_table(table, columns)


def size_table(rows: Iterable[dict[str, Any]]) -> str:
    """Markdown table, one line per bits scheme (high precision first), sizes averaged over
    recipes and seeds: size, how many times smaller than float, and the k/32 bound.

    A k-bit model ideally takes k/32 of the float32 size; the bound allows 10% on top for
    scales and headers and reads "met" or "missed".
    """
    rows = _check_rows(rows)
    if not rows:
        raise KdqError(_EMPTY)
    by_bits: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_bits.setdefault(row["bits"], []).append(row)
    table = []
    for bits in sorted(by_bits, key=_precision_key):
        size, full = _mean_of(by_bits[bits], "size_bytes"), _mean_of(by_bits[bits], "float_size_bytes")
        cell = {"bits": bits, "size": "-", "ratio": "-", "bound": "-"}
        if size is not None:
            cell["size"] = human_bytes(size)
        if full is not None:
            allowed = full * weight_bits(bits) / 32 * _BOUND_SLACK
            verdict = "met" if size is not None and size <= allowed else "missed"
            cell["bound"] = f"{human_bytes(allowed)} ({verdict})" if size is not None else human_bytes(allowed)
            if size:
                cell["ratio"] = f"{full / size:.1f}x"
        table.append(cell)
    columns = [("bits", "bits"), ("size", "size"), ("ratio", "x smaller than float"), ("bound", "k/32 bound (+10%)")]
    return markdown_table(table, columns)


def _lines(summary: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Plot lines: one per recipe, split by activation bits where a recipe has two schemes
    at the same weight bits (w2a2 and w2a32), which would otherwise share one x."""
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for s in summary:
        by_recipe.setdefault(s["recipe"], []).append(s)
    lines: dict[str, list[dict[str, Any]]] = {}
    for recipe, group in by_recipe.items():
        if len({s["weight_bits"] for s in group}) == len(group):
            lines[recipe] = group
            continue
        for s in group:
            act = _parse(s["bits"])[1]
            label = f"{recipe}, float act" if act == _FLOAT_BITS else f"{recipe}, a{act}"
            lines.setdefault(label, []).append(s)
    return lines


def plot_sweep(rows: Iterable[dict[str, Any]], path: str | Path, reference: float | None = None, title: str = "") -> Path:
    """Accuracy against weight bits (log2 axis, high precision on the left), one line per
    recipe with mean ± std error bars, and a dashed line at the float `reference`."""
    _check_reference(reference)
    summary = summarize_sweep(rows)
    if not summary:
        raise KdqError(_EMPTY)
    lines = _lines(summary)
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for i, (label, group) in enumerate(lines.items()):
        # A small multiplicative dodge, so recipes at the same bits do not hide each other's bars.
        dodge = 2 ** (0.04 * (i - (len(lines) - 1) / 2))
        ax.errorbar([s["weight_bits"] * dodge for s in group], [s["mean"] for s in group],
                    yerr=[s["std"] for s in group], marker="o", capsize=3, label=label)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="float")
    ticks = sorted({s["weight_bits"] for s in summary}, reverse=True)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(max(ticks) * 2**0.5, min(ticks) / 2**0.5)  # reversed: high precision on the left
    ax.set_xlabel("weight bits")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "accuracy by weight bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
