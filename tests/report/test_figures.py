"""Report figures: the Pareto front against hand cases and a brute force, every figure a valid
PNG (or None with nothing to draw), and what each figure draws, read back from the figure."""

from __future__ import annotations

import random

import matplotlib.image
import pytest
from matplotlib.figure import Figure

from kdq.errors import KdqError
from kdq.report import figures
from kdq.report.figures import (
    pareto_front,
    plot_accuracy_bars,
    plot_confusions,
    plot_curves,
    plot_per_class,
    plot_sweep,
    plot_tradeoff,
    tradeoff_front,
)
from tests.report.fake import keep_figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["cat", "dog", "frog"]


def history(kd: bool, shift: float = 0.0) -> list[dict]:
    """Three epochs of metrics.jsonl rows; a KD run logs train_kd and train_ce beside the total."""
    out = []
    for e in (1, 2, 3):
        ce = 1.5 / e + shift
        h = {"epoch": e, "lr": 0.1, "train_loss": ce, "train_ce": ce, "train_accuracy": 0.5 + 0.1 * e,
             "val_accuracy": 0.45 + 0.1 * e + shift, "val_loss": ce + 0.1}
        if kd:
            h.update(train_kd=2.0 / e, train_loss=0.5 * ce + 0.5 * 2.0 / e)
        out.append(h)
    return out


def make_row(label: str, accuracy: float, size: int, latency: float, **extra) -> dict:
    row = {"label": label, "accuracy": accuracy, "accuracy_std": None, "seeds": 1, "size_bytes": size,
           "latency_ms": latency, "latency_spread_ms": 0.01, "params": size // 4, "macs": size * 10,
           "classes": CLASSES, "per_class_accuracy": {"cat": accuracy - 0.05, "dog": accuracy, "frog": accuracy + 0.03},
           "confusion_matrix": [[8, 1, 1], [0, 9, 1], [2, 0, 8]], "history": history(kd=False),
           "bits": None, "sparsity": None}
    row.update(extra)
    return row


@pytest.fixture
def rows() -> list[dict]:
    return [
        make_row("teacher", 0.93, 4_000_000, 2.0, seeds=3, accuracy_std=0.004),
        make_row("student", 0.88, 300_000, 0.3),
        make_row("kd", 0.905, 300_000, 0.31, seeds=3, accuracy_std=0.006, history=history(kd=True, shift=0.05)),
        make_row("int8", 0.90, 80_000, 0.2),
        make_row("slow-bad", 0.87, 900_000, 1.2),
    ]


@pytest.fixture
def drawn(monkeypatch) -> list[Figure]:
    """Every figure figures saves, kept for inspection."""
    return keep_figures(monkeypatch, figures)


def assert_png(path, min_side: int = 100) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height >= min_side and width >= min_side
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # the atomic write cleaned up


def dominated_brute_force(points: list[tuple[float, float]]) -> list[int]:
    """The front by its definition: no point at most as costly, at least as accurate and better
    in one (or an identical point given earlier)."""
    keep = []
    for i, (c, a) in enumerate(points):
        beaten = any((c2 <= c and a2 >= a and (c2 < c or a2 > a)) or ((c2, a2) == (c, a) and j < i)
                     for j, (c2, a2) in enumerate(points) if j != i)
        if not beaten:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


# --- pareto_front ------------------------------------------------------------------------------

@pytest.mark.parametrize("points, front", [
    ([], []),
    ([(1.0, 0.5)], [0]),
    ([(1, 0.9), (2, 0.8)], [0]),                            # costlier and worse: off the front
    ([(1, 0.5), (2, 0.8), (3, 0.7), (4, 0.9)], [0, 1, 3]),  # (3, 0.7) beaten by (2, 0.8)
    ([(3, 0.9), (1, 0.5), (2, 0.8)], [1, 2, 0]),            # answered in order of increasing cost
    ([(1, 0.5), (1, 0.5)], [0]),                            # exact duplicates: the first only
    ([(1, 0.5), (1, 0.6)], [1]),                            # same cost: the more accurate
    ([(1, 0.5), (2, 0.5)], [0]),                            # same accuracy: the cheaper
    ([(5, 0.1), (4, 0.2), (3, 0.3)], [2]),                  # one point beats all
])
def test_pareto_front_hand_cases(points, front):
    assert pareto_front(points) == front


def test_pareto_front_matches_its_definition_on_random_points_with_ties():
    rng = random.Random(0)
    for _ in range(200):
        points = [(rng.randint(1, 6), rng.randint(0, 6) / 6) for _ in range(rng.randint(1, 9))]
        assert pareto_front(points) == dominated_brute_force(points), points


@pytest.mark.parametrize("bad", [[(1.0, float("nan"))], [(float("inf"), 0.5)], [(1.0,)], [("1", 0.5)], [0.5]])
def test_pareto_front_refuses_points_that_are_not_two_finite_numbers(bad):
    with pytest.raises(KdqError, match="Pareto point 0"):
        pareto_front(bad)


# --- every figure: a PNG, or None with nothing to draw ------------------------------------------

FIGURES = {
    "size": lambda rows, path: plot_tradeoff(rows, "size_bytes", path, "accuracy against size"),
    "latency": lambda rows, path: plot_tradeoff(rows, "latency_ms", path, "accuracy against latency"),
    "bars": lambda rows, path: plot_accuracy_bars(rows, path, "accuracy"),
    "per_class": lambda rows, path: plot_per_class(rows, path, "per class"),
    "confusions": lambda rows, path: plot_confusions(rows[0], path, "confusion") if rows else None,
    "curves": lambda rows, path: plot_curves(rows, path, "curves"),
    "macs": lambda rows, path: plot_sweep(rows, "macs", path, "MACs"),
}


@pytest.mark.parametrize("name", FIGURES)
def test_each_figure_writes_a_valid_png(name, rows, tmp_path):
    path = tmp_path / f"{name}.png"
    assert FIGURES[name](rows, path) == path
    assert_png(path)


@pytest.mark.parametrize("name", FIGURES)
def test_each_figure_returns_none_and_writes_nothing_with_nothing_to_draw(name, tmp_path):
    path = tmp_path / f"{name}.png"
    assert FIGURES[name]([], path) is None
    # rows that carry none of the figure's keys (or None there) are skipped quietly
    bare = [{"label": "a"}, {"label": "b", "accuracy": None, "size_bytes": None, "latency_ms": None, "macs": None,
                             "history": None, "per_class_accuracy": None, "confusion_matrix": None}]
    assert FIGURES[name](bare, path) is None
    assert not path.exists()


def test_figures_are_byte_for_byte_deterministic(rows, tmp_path):
    for name, draw in FIGURES.items():
        first, second = draw(rows, tmp_path / f"{name}-1.png"), draw(rows, tmp_path / f"{name}-2.png")
        assert first.read_bytes() == second.read_bytes(), name


def test_a_row_that_is_not_a_dict_is_named(tmp_path):
    with pytest.raises(KdqError, match="figure row 1 must be a dict"):
        plot_accuracy_bars([{"label": "a", "accuracy": 0.9}, ["b", 0.8]], tmp_path / "x.png")


@pytest.mark.parametrize("draw, axis", [(plot_tradeoff, "params"), (plot_sweep, "size_bytes")])
def test_an_unknown_axis_is_refused(draw, axis, rows, tmp_path):
    with pytest.raises(KdqError, match=f"got '{axis}'"):
        draw(rows, axis, tmp_path / "x.png")


# --- what each figure draws ----------------------------------------------------------------------

def test_tradeoff_labels_every_point_without_overlap_and_steps_along_the_front(rows, drawn, tmp_path):
    rows.append(make_row("broken", float("nan"), 100_000, 0.1))  # no accuracy: left out quietly
    plot_tradeoff(rows, "size_bytes", tmp_path / "size.png")
    ax = drawn[0].axes[0]
    labels = {t.get_text(): t for t in ax.texts}
    assert set(labels) == {"teacher", "student", "kd", "int8", "slow-bad"}
    boxes = [t.get_window_extent() for t in labels.values()]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert ax.get_xscale() == "log" and "MB" in ax.get_xlabel()
    # front by size: int8 (78 KB, 90.0), kd (293 KB, 90.5), teacher (3.8 MB, 93.0); student and slow-bad beaten
    (step,) = [line for line in ax.get_lines() if line.get_drawstyle() == "steps-post"]
    assert list(step.get_ydata()) == pytest.approx([90.0, 90.5, 93.0])
    assert list(step.get_xdata()) == pytest.approx([80_000 / 2**20, 300_000 / 2**20, 4_000_000 / 2**20])


def test_tradeoff_front_names_the_points_the_figure_steps_through(rows):
    rows.append(make_row("broken", float("nan"), 100_000, 0.1))  # left out of the front as of the figure
    assert tradeoff_front(rows, "size_bytes") == ["int8", "kd", "teacher"]
    assert tradeoff_front(rows, "latency_ms") == ["int8", "kd", "teacher"]
    with pytest.raises(KdqError, match="got 'params'"):
        tradeoff_front(rows, "params")


def test_tradeoff_size_axis_is_in_kb_when_every_model_is_small(rows, drawn, tmp_path):
    small = [r for r in rows if r["size_bytes"] < 2**20]
    plot_tradeoff(small, "size_bytes", tmp_path / "size.png")
    assert "KB" in drawn[0].axes[0].get_xlabel()


def test_accuracy_bars_zoom_in_and_say_so_when_accuracies_are_close(rows, drawn, tmp_path):
    plot_accuracy_bars(rows, tmp_path / "bars.png")
    ax = drawn[0].axes[0]
    bottom, top = ax.get_ylim()
    assert 50 < bottom < 87 and top > 93.4
    assert "not 0" in ax.get_ylabel()
    written = [t.get_text() for t in ax.texts]
    assert written[0] == "93.00\n± 0.40" and written[1] == "88.00"  # std only where seeds > 1
    (bars,) = [c for c in ax.containers if hasattr(c, "lines")]  # one errorbar set: teacher and kd
    assert len(bars.lines[2][0].get_segments()) == 2


def test_accuracy_bars_start_at_zero_when_accuracies_spread_widely(drawn, tmp_path):
    plot_accuracy_bars([{"label": "a", "accuracy": 0.2}, {"label": "b", "accuracy": 0.9}], tmp_path / "bars.png")
    ax = drawn[0].axes[0]
    assert ax.get_ylim()[0] == 0 and "not 0" not in ax.get_ylabel()


def test_per_class_groups_bars_by_class_with_one_colour_per_row(rows, drawn, tmp_path):
    plot_per_class(rows[:3], tmp_path / "pc.png")
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["teacher", "student", "kd"]
    assert len(ax.patches) == 9
    assert len({p.get_facecolor() for p in ax.patches}) == 3


def test_confusions_draws_counts_and_row_fractions(rows, drawn, tmp_path):
    plot_confusions(rows[0], tmp_path / "cm.png")
    counts, norm = drawn[0].axes
    assert [t.get_text() for t in counts.texts][:3] == ["8", "1", "1"]
    assert [t.get_text() for t in norm.texts][:3] == ["0.80", "0.10", "0.10"]
    assert [t.get_text() for t in counts.get_yticklabels()] == CLASSES


@pytest.mark.parametrize("matrix, classes, message", [
    ([[1, 2], [3]], CLASSES, "square"),
    ([[1, -1], [0, 2]], ["a", "b"], "not a count"),
    ([[1, 0.5], [0, 2]], ["a", "b"], "not a count"),
    ([[1, 0], [0, 2]], CLASSES, "must match"),
])
def test_confusions_refuses_a_damaged_matrix(matrix, classes, message, tmp_path):
    with pytest.raises(KdqError, match=message):
        plot_confusions({"label": "x", "confusion_matrix": matrix, "classes": classes}, tmp_path / "cm.png")


def test_curves_draw_every_loss_term_coloured_by_run_styled_by_term(rows, drawn, tmp_path):
    plot_curves(rows[1:3], tmp_path / "curves.png")  # student: CE only; kd: total, ce, kd
    loss_ax, acc_ax = drawn[0].axes
    lines = loss_ax.get_lines()
    assert len(lines) == 1 + 3  # the student's train_ce equals its total, so it is not drawn twice
    student, kd = lines[0].get_color(), lines[1].get_color()
    assert student != kd and {line.get_color() for line in lines[1:]} == {kd}
    assert len({line.get_linestyle() for line in lines[1:]}) == 3
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["total (train_loss)", "ce", "kd"]
    assert [t.get_text() for t in acc_ax.get_legend().get_texts()] == ["student", "kd"]
    assert list(acc_ax.get_lines()[0].get_ydata()) == pytest.approx([55.0, 65.0, 75.0])


def test_sweep_over_bits_is_categorical_ascending_one_line_per_group(drawn, tmp_path):
    rows = [{"label": f"{g}-w{b}", "group": g, "bits": b, "accuracy": 0.7 + 0.02 * b, "seeds": 1}
            for g in ("qkd", "apprentice") for b in (8, 1, 4, 2)]
    rows.append({"label": "float", "bits": None, "accuracy": 0.95})  # no bits: not on this axis
    plot_sweep(rows, "bits", tmp_path / "bits.png")
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["qkd", "apprentice"]
    first = ax.get_lines()[0]
    assert list(first.get_ydata()) == pytest.approx([72.0, 74.0, 78.0, 86.0])
    assert list(first.get_xdata()) == pytest.approx([0, 1, 2, 3], abs=0.1)


def test_sweep_over_sparsity_without_groups_is_one_line_in_percent(drawn, tmp_path):
    rows = [{"label": f"s{s}", "sparsity": s, "accuracy": 0.9 - s / 10} for s in (0.5, 0.0, 0.9)]
    plot_sweep(rows, "sparsity", tmp_path / "sp.png")
    ax = drawn[0].axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == pytest.approx([0, 50, 90])
    assert ax.get_legend() is None


def test_tradeoff_moves_labels_of_crowded_points_apart(drawn, tmp_path):
    # three runs of one size within 0.4 points, beside a far one: the same offset would stack their labels
    rows = [make_row(f"run-{k}", 0.900 + 0.002 * k, 300_000, 0.3) for k in range(3)]
    rows.append(make_row("far", 0.70, 3_000_000, 3.0))
    plot_tradeoff(rows, "size_bytes", tmp_path / "size.png")
    ax = drawn[0].axes[0]
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    legend = ax.get_legend().get_window_extent()
    assert not any(box.overlaps(legend) for box in boxes)
