"""Figures of a comparison report: accuracy against cost with the Pareto front, accuracy bars,
per-class accuracy, confusion matrices, overlaid training curves and sweeps.

Every function takes rows, plain dicts with (some of) these keys:

    label, accuracy (a fraction), accuracy_std, seeds, size_bytes, latency_ms, latency_spread_ms,
    params, macs, per_class_accuracy ({class: fraction}), classes, confusion_matrix (list of
    lists of counts), history (metrics.jsonl rows), bits, sparsity, group

and writes one PNG atomically, returning its path, or None when no row has what the figure
needs (the page then leaves that section out). A row whose key is missing, None or not a finite
number is left out of that one figure without a word: a comparison mixes runs that record
different things (an ONNX export has no training history, a float run has no bits). Accuracy is
drawn in percent. Colours follow the rows' order, so the figures are the same on every run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Headless: kdq/report/__init__.py imports plots (which selects Agg) before this module.
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, FuncFormatter, NullLocator
from matplotlib.transforms import Bbox

from kdq.errors import KdqError
from kdq.report.plots import (
    TERM_STYLES,
    confusion_size,
    draw_confusion,
    epoch_axis,
    finite_float,
    history_series,
    loss_scale,
    loss_series,
    save_figure,
)

_COLOURS = plt.get_cmap("tab10").colors
_TRADEOFF_AXES = ("size_bytes", "latency_ms")
_SWEEP_AXES = ("bits", "sparsity", "macs")
# Where a point's label may go, in points from the point, tried in turn until one overlaps
# nothing: level with the point first (least doubt which point it names), then the corners,
# above and below, then all of these further out.
_LABEL_OFFSETS = tuple(
    (dx * k, dy * k, ha, va)
    for k in (1, 2.5)
    for dx, dy, ha, va in ((6, 0, "left", "center"), (-6, 0, "right", "center"), (5, 4, "left", "bottom"),
                           (5, -4, "left", "top"), (-5, 4, "right", "bottom"), (-5, -4, "right", "top"),
                           (0, 7, "center", "bottom"), (0, -7, "center", "top"))
)


def _colour(i: int) -> tuple[float, float, float]:
    return _COLOURS[i % len(_COLOURS)]


def _rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows as a list; a row that is not a dict is a caller's bug, named by its index."""
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise KdqError(f"figure row {i} must be a dict with label and accuracy, got {type(row).__name__}")
    return rows


def _label(row: Mapping[str, Any], i: int) -> str:
    label = row.get("label")
    return f"run {i + 1}" if label is None else str(label)


def _percent(row: Mapping[str, Any]) -> tuple[float, float] | None:
    """(accuracy, std) of a row in percent; std is 0 where unknown. None without an accuracy."""
    acc = finite_float(row.get("accuracy"))
    if acc is None:
        return None
    std = finite_float(row.get("accuracy_std"))
    return acc * 100, (std * 100 if std is not None and std > 0 else 0.0)


def _bars(errors: Sequence[float]) -> list[float] | None:
    """Error bar lengths for matplotlib, or None when all are 0 (no stray caps on the markers)."""
    return list(errors) if any(errors) else None


def _seed_std(row: Mapping[str, Any], std: float) -> float:
    """The std to draw as an error bar: only for a row averaged over more than one seed."""
    seeds = finite_float(row.get("seeds"))
    return std if seeds is not None and seeds > 1 else 0.0


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats, where (cost, accuracy) is better with smaller
    cost and larger accuracy; in order of increasing cost (so also increasing accuracy).

    A point is beaten by one at most as costly and at least as accurate, and better in one of
    the two. Of exact duplicates only the first (lowest index) is on the front, so the answer
    never depends on anything but the input order.
    """
    for i, point in enumerate(points):
        if not isinstance(point, (tuple, list)) or len(point) != 2 or finite_float(point[0]) is None or finite_float(point[1]) is None:
            raise KdqError(f"Pareto point {i} must be two finite numbers (cost, accuracy), got {point!r}")
    # cheapest first; at equal cost the most accurate first, then the first given
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:  # more accurate than everything as cheap or cheaper
            front.append(i)
            best = points[i][1]
    return front


def _overlap(a: Bbox, b: Bbox) -> float:
    """Area (pixels) two boxes share."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _label_points(ax: Axes, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str],
                  xerr: Sequence[float], yerr: Sequence[float]) -> None:
    """Write every label beside its point, each at the first offset where it covers no marker,
    error bar, legend or other label and stays inside the axes (else where it covers least).
    Call it last: it measures text at the axes' final limits."""
    ax.autoscale_view()
    frame = ax.get_window_extent()
    to_pixels = ax.transData.transform
    taken = []  # pixel boxes of the legend, the markers and error bars, then of each placed label
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent())
    for x, y, dx, dy in zip(xs, ys, xerr, yerr):
        (px, py), (left, bottom), (right, top) = to_pixels([(x, y), (x - dx if x > dx else x, y - dy), (x + dx, y + dy)])
        taken += [Bbox.from_extents(px - 5, py - 5, px + 5, py + 5),
                  Bbox.from_extents(min(left, px - 5), py - 2, max(right, px + 5), py + 2),
                  Bbox.from_extents(px - 2, min(bottom, py - 5), px + 2, max(top, py + 5))]
    # top-most points first: their labels get the free space above the data
    for k in sorted(range(len(labels)), key=lambda k: (-ys[k], xs[k], k)):
        best = None
        for dx, dy, ha, va in _LABEL_OFFSETS:
            text = ax.annotate(labels[k], (xs[k], ys[k]), xytext=(dx, dy), textcoords="offset points",
                               ha=ha, va=va, fontsize=7)
            box = text.get_window_extent()  # measured by the figure's own renderer
            cost = sum(_overlap(box, other) for other in taken) + box.width * box.height - _overlap(box, frame)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost == 0:
                break
        taken.append(best[2])


def _log_ticks(ax: Axes, fmt: Callable[[float], str] = "{:g}".format) -> None:
    """Readable numbers on a log x axis, with labelled minor ticks where a narrow range would
    otherwise show one major tick or none: all of them within 3x, at 2 and 5 within 30x."""
    ax.autoscale_view()
    lo, hi = ax.get_xlim()
    ratio = hi / lo

    def minor(v: float, _: int) -> str:
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        return fmt(v) if ratio < 3 or (ratio < 30 and mantissa in (2, 5)) else ""

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="x", which="both", labelsize=8)


def _tradeoff_points(rows: Iterable[Mapping[str, Any]], x: str) -> list[tuple[str, float, float, float, float]]:
    """The points plot_tradeoff draws: (label, cost, accuracy %, std %, cost spread) of each row
    with a positive cost and an accuracy."""
    if x not in _TRADEOFF_AXES:
        raise KdqError(f"trade-off axis must be one of {', '.join(_TRADEOFF_AXES)}, got {x!r}")
    points = []
    for i, row in enumerate(_rows(rows)):
        cost, acc = finite_float(row.get(x)), _percent(row)
        if cost is None or cost <= 0 or acc is None:  # a log axis has no place for 0
            continue
        spread = finite_float(row.get("latency_spread_ms")) if x == "latency_ms" else None
        points.append((_label(row, i), cost, acc[0], _seed_std(row, acc[1]), spread if spread and spread > 0 else 0.0))
    return points


def tradeoff_front(rows: Iterable[Mapping[str, Any]], x: str) -> list[str]:
    """Labels of the rows on the Pareto front that plot_tradeoff(rows, x) draws, cheapest first."""
    points = _tradeoff_points(rows, x)
    return [points[i][0] for i in pareto_front([(p[1], p[2]) for p in points])]


def plot_tradeoff(rows: Iterable[Mapping[str, Any]], x: str, path: str | Path, title: str = "") -> Path | None:
    """Accuracy against model size or latency (log axis), every point labelled, the Pareto front
    (best accuracy for its cost, from the mean accuracies) drawn as a step line over starred
    points; error bars: accuracy std over seeds, and the latency spread."""
    points = _tradeoff_points(rows, x)
    if not points:
        return None
    if x == "size_bytes":
        scale, unit = (1024**2, "MB") if max(p[1] for p in points) >= 1024**2 else (1024, "KB")
        xlabel = f"model size ({unit}, log scale)"
    else:
        scale, xlabel = 1, "latency at batch 1 (ms, median, log scale)"
    xs = [p[1] / scale for p in points]
    ys = [p[2] for p in points]
    front = pareto_front(list(zip(xs, ys)))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for members, style in (([k for k in range(len(points)) if k not in front],
                            {"fmt": "o", "color": "tab:gray", "label": "other runs"}),
                           (front, {"fmt": "*", "color": "tab:red", "markersize": 12, "label": "Pareto front"})):
        if members:
            ax.errorbar([xs[k] for k in members], [ys[k] for k in members],
                        yerr=_bars([points[k][3] for k in members]), xerr=_bars([points[k][4] / scale for k in members]),
                        capsize=3, elinewidth=1, zorder=3, **style)
    ax.step([xs[k] for k in front], [ys[k] for k in front], where="post", color="tab:red", alpha=0.5, zorder=2)
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)
    _log_ticks(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or f"accuracy against {'size' if x == 'size_bytes' else 'latency'}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")  # "best" keeps clear of the markers; the labels then keep clear of it
    _label_points(ax, xs, ys, [p[0] for p in points], [p[4] / scale for p in points], [p[3] for p in points])
    return save_figure(fig, path)


def _zoom(lows: Sequence[float], highs: Sequence[float]) -> tuple[float, float]:
    """y limits (percent) for bars: from 0 when the values spread widely, else from a round
    number below the lowest by about their spread, so differences of a point stay visible."""
    lo, hi = min(lows), max(highs)
    span = max(hi - lo, 1.0)
    step = 10 ** math.floor(math.log10(span))
    bottom = max(0.0, math.floor((lo - span) / step) * step)
    if bottom < 0.2 * hi:  # zooming would cut off little: show the whole bar
        bottom = 0.0
    return bottom, hi + 0.25 * (hi - bottom)  # headroom for the values written above the bars


def _zoomed_label(bottom: float) -> str:
    return f"accuracy (%), axis from {bottom:g}% (not 0)" if bottom > 0 else "accuracy (%)"


def plot_accuracy_bars(rows: Iterable[Mapping[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """One bar per row with its accuracy written above it; error bars (std) on rows averaged
    over several seeds; the y axis starts above 0 when all accuracies are close, and says so."""
    bars = []  # (label, accuracy %, std %)
    for i, row in enumerate(_rows(rows)):
        acc = _percent(row)
        if acc is not None:
            bars.append((_label(row, i), acc[0], _seed_std(row, acc[1])))
    if not bars:
        return None
    n = len(bars)
    fig, ax = plt.subplots(figsize=(min(max(5.0, 0.75 * n + 2), 24.0), 4.2))
    ax.bar(range(n), [b[1] for b in bars], color=[_colour(k) for k in range(n)], width=0.7, zorder=2)
    spread = [k for k in range(n) if bars[k][2] > 0]
    if spread:
        ax.errorbar(spread, [bars[k][1] for k in spread], yerr=[bars[k][2] for k in spread], fmt="none",
                    ecolor="black", capsize=4, elinewidth=1, zorder=3)
    bottom, top = _zoom([b[1] - b[2] for b in bars], [b[1] + b[2] for b in bars])
    for k, (_, acc, std) in enumerate(bars):
        text = f"{acc:.2f}" + (f"\n± {std:.2f}" if std else "")
        ax.annotate(text, (k, acc + std), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=7)
    ax.set_ylim(bottom, top)
    long = max(len(b[0]) for b in bars) > 10 or n > 8
    ax.set_xticks(range(n), [b[0] for b in bars], rotation=30 if long else 0, ha="right" if long else "center",
                  fontsize=8)
    ax.set_ylabel(_zoomed_label(bottom))
    ax.set_title(title or "accuracy")
    ax.grid(alpha=0.3, axis="y", zorder=0)
    return save_figure(fig, path)


def _class_order(rows: Sequence[Mapping[str, Any]], accuracies: Sequence[Mapping[str, Any]]) -> list[str]:
    """Classes in the data set's order (the first row's `classes`), then any others first-seen."""
    order: dict[str, None] = {}
    for row in rows:
        classes = row.get("classes")
        if isinstance(classes, (list, tuple)):
            order.update((str(c), None) for c in classes)
            break
    for per_class in accuracies:
        order.update((str(c), None) for c in per_class)
    return [c for c in order if any(finite_float(p.get(c)) is not None for p in accuracies)]


def plot_per_class(rows: Iterable[Mapping[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Per-class accuracy as grouped bars: classes along x, one colour per row."""
    kept, accuracies, labels = [], [], []
    for i, row in enumerate(_rows(rows)):
        per_class = row.get("per_class_accuracy")
        if isinstance(per_class, Mapping) and any(finite_float(v) is not None for v in per_class.values()):
            kept.append(row)
            accuracies.append({str(c): v for c, v in per_class.items()})
            labels.append(_label(row, i))
    if not kept:
        return None
    classes = _class_order(kept, accuracies)
    n, width = len(kept), 0.8 / len(kept)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.22 * len(classes) * n + 2), 30.0), 4.2))
    values = []
    for k, (per_class, label) in enumerate(zip(accuracies, labels)):
        at = [(j, finite_float(per_class.get(c))) for j, c in enumerate(classes)]
        at = [(j, v * 100) for j, v in at if v is not None]
        values += [v for _, v in at]
        ax.bar([j + (k - (n - 1) / 2) * width for j, _ in at], [v for _, v in at], width=width, color=_colour(k),
               label=label, zorder=2)
    bottom, top = _zoom(values, values)
    ax.set_ylim(bottom, top)
    many = len(classes) > 12
    ax.set_xticks(range(len(classes)), classes, rotation=90 if many else 30, ha="center" if many else "right",
                  fontsize=6 if many else 8)
    ax.set_xlim(-0.6, len(classes) - 0.4)
    ax.set_ylabel(_zoomed_label(bottom))
    ax.set_title(title or "accuracy per class")
    ax.grid(alpha=0.3, axis="y", zorder=0)
    ax.legend(fontsize=8, ncols=min(n, 4), loc="upper center")
    return save_figure(fig, path)


def _confusion_matrix(row: Mapping[str, Any], label: str) -> tuple[list[list[int]], list[str]] | None:
    """The row's confusion matrix and class names, checked; None when it has none."""
    matrix = row.get("confusion_matrix")
    if matrix is None or (isinstance(matrix, (list, tuple)) and not matrix):
        return None
    n = len(matrix) if isinstance(matrix, (list, tuple)) else 0
    if not n or any(not isinstance(r, (list, tuple)) or len(r) != n for r in matrix):
        raise KdqError(f"confusion matrix of {label} must be a square list of lists of counts; "
                       "regenerate results.json with kdq evaluate")
    cells = [finite_float(v) for r in matrix for v in r]
    if any(v is None or v < 0 or v != int(v) for v in cells):
        raise KdqError(f"confusion matrix of {label} holds a cell that is not a count (a whole number >= 0); "
                       "regenerate results.json with kdq evaluate")
    classes = row.get("classes")
    if classes is None:
        classes = [str(j) for j in range(n)]
    elif not isinstance(classes, (list, tuple)) or len(classes) != n:
        raise KdqError(f"{label} has {n} rows in its confusion matrix but classes lists "
                       f"{len(classes) if isinstance(classes, (list, tuple)) else 'no'} names; they must match")
    return [[int(v) for v in r] for r in matrix], [str(c) for c in classes]


def plot_confusions(row: Mapping[str, Any], path: str | Path, title: str = "") -> Path | None:
    """One run's confusion matrix twice: raw counts, and normalised by row (the share of each
    true class predicted as each class, which shows a rare class's errors as clearly)."""
    if not isinstance(row, Mapping):
        raise KdqError(f"plot_confusions takes one row (a dict), got {type(row).__name__}")
    label = _label(row, 0)
    found = _confusion_matrix(row, label)
    if found is None:
        return None
    matrix, classes = found
    size = confusion_size(len(classes))
    fig, (counts_ax, norm_ax) = plt.subplots(1, 2, figsize=(2 * size + 0.5, size))
    draw_confusion(counts_ax, matrix, classes, normalise=False, text="counts")
    counts_ax.set_title("counts", fontsize=9)
    draw_confusion(norm_ax, matrix, classes, normalise=True, text="fractions")
    norm_ax.set_title("normalised by true class (rows sum to 1)", fontsize=9)
    fig.suptitle(title or f"confusion matrix: {label}")
    return save_figure(fig, path)


def plot_curves(rows: Iterable[Mapping[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Training curves of several runs overlaid: every loss term its own line (total, kd, ce,
    feature terms; colour = run, line style = term), and validation accuracy, against epoch."""
    runs = []  # (label, colour, loss lines, val accuracy line)
    for i, row in enumerate(_rows(rows)):
        history = row.get("history")
        if not isinstance(history, (list, tuple)) or not history:
            continue
        losses, val = loss_series(history), history_series(history, "val_accuracy")
        if losses or val[1]:
            runs.append((_label(row, i), _colour(len(runs)), losses, val))
    if not runs:
        return None
    terms = list(dict.fromkeys(t for _, _, losses, _ in runs for t in losses if t != "total"))
    styles = {"total": "-", **{t: TERM_STYLES[j % len(TERM_STYLES)] for j, t in enumerate(terms)}}
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for _, colour, losses, (epochs, val) in runs:
        for term, (x, y) in losses.items():
            loss_ax.plot(x, y, color=colour, linestyle=styles[term], linewidth=1.8 if term == "total" else 1.2)
        if val:
            acc_ax.plot(epochs, [v * 100 for v in val], color=colour, linewidth=1.5)
    # two small legends instead of runs x terms entries: colours name runs, styles name terms
    acc_ax.legend([Line2D([], [], color=c) for _, c, _, _ in runs], [r[0] for r in runs], fontsize=8, title="run",
                  title_fontsize=8)
    used = [t for t in styles if any(t in losses for _, _, losses, _ in runs)]
    loss_ax.legend([Line2D([], [], color="black", linestyle=styles[t]) for t in used],
                   ["total (train_loss)" if t == "total" else t for t in used], fontsize=8, title="loss term",
                   title_fontsize=8)
    loss_ax.set_ylabel("training " + loss_scale(loss_ax, [v for *_, losses, _ in runs for _, y in losses.values() for v in y]))
    acc_ax.set_ylabel("validation accuracy (%)")
    for ax in (loss_ax, acc_ax):
        epoch_axis(ax)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "training curves")
    return save_figure(fig, path)


def _sweep_x(row: Mapping[str, Any], x: str) -> float | None:
    """The row's position on the sweep axis: weight bits (a whole number >= 1), sparsity (a
    fraction in [0, 1], drawn in percent) or MACs (> 0); None when it has none."""
    value = finite_float(row.get(x))
    if value is None:
        return None
    if x == "bits":
        return value if value >= 1 and value == int(value) else None
    if x == "sparsity":
        return value * 100 if 0 <= value <= 1 else None
    return value if value > 0 else None


def plot_sweep(rows: Iterable[Mapping[str, Any]], x: str, path: str | Path, title: str = "") -> Path | None:
    """Accuracy (mean ± std over seeds) against weight bits (evenly spaced, ascending), sparsity
    (%) or MACs kept (log axis): one line per `group` when rows carry one, else one line."""
    if x not in _SWEEP_AXES:
        raise KdqError(f"sweep axis must be one of {', '.join(_SWEEP_AXES)}, got {x!r}")
    lines: dict[str, list[tuple[float, float, float]]] = {}
    grouped = False
    for row in _rows(rows):
        at, acc = _sweep_x(row, x), _percent(row)
        if at is None or acc is None:
            continue
        grouped = grouped or row.get("group") is not None
        name = "runs" if row.get("group") is None else str(row["group"])
        lines.setdefault(name, []).append((at, acc[0], _seed_std(row, acc[1])))
    if not lines:
        return None
    ticks = sorted({p[0] for line in lines.values() for p in line})
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, (name, line) in enumerate(lines.items()):
        line.sort()
        if x == "bits":  # categorical: evenly spaced, nudged apart so lines at one width do not hide each other
            xs = [ticks.index(p[0]) + 0.06 * (k - (len(lines) - 1) / 2) for p in line]
        else:
            xs = [p[0] for p in line]
        ax.errorbar(xs, [p[1] for p in line], yerr=_bars([p[2] for p in line]), marker="o", capsize=3, color=_colour(k),
                    label=name)
    if x == "bits":
        ax.set_xticks(range(len(ticks)), [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(-0.5, len(ticks) - 0.5)
        ax.set_xlabel("weight bits")
    elif x == "sparsity":
        ax.set_xlabel("sparsity (% of weights zero)")
    else:
        ax.set_xscale("log")
        ax.margins(x=0.08)
        _log_ticks(ax, EngFormatter())
        ax.set_xlabel("MACs kept (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or f"accuracy against {({'bits': 'weight bits', 'macs': 'MACs'}).get(x, x)}")
    ax.grid(alpha=0.3)
    if grouped:
        ax.legend(fontsize=8)
    return save_figure(fig, path)
