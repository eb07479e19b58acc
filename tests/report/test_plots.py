"""Per-run figures: the loss terms plot_history draws, and the confusion drawing shared with the report."""

from __future__ import annotations

import math

import matplotlib.image
import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from kdq.errors import KdqError
from kdq.report import plots
from kdq.report.plots import draw_confusion, history_series, loss_scale, loss_series, plot_confusion, plot_history
from tests.report.fake import keep_figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def kd_history() -> list[dict]:
    """metrics.jsonl rows of a KD run: the total is a weighted sum of kd and ce."""
    return [{"epoch": e, "lr": 0.05, "train_loss": 2.5 / e, "train_kd": 3.0 / e, "train_ce": 1.0 / e,
             "train_accuracy": 0.5 + 0.1 * e, "val_accuracy": 0.6 + 0.1 * e, "val_loss": 0.9 / e,
             "epoch_time_s": 8.0, "images_per_s": 2000.0} for e in (1, 2, 3)]


@pytest.fixture
def drawn(monkeypatch) -> list[Figure]:
    """Every figure plots saves, kept for inspection."""
    return keep_figures(monkeypatch, plots)


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


def test_loss_series_gives_the_total_and_each_term():
    series = loss_series(kd_history())
    assert list(series) == ["total", "ce", "kd"]  # train_accuracy is not a loss
    assert series["total"] == ([1, 2, 3], [2.5, 1.25, 2.5 / 3])
    assert series["kd"] == ([1, 2, 3], [3.0, 1.5, 1.0])


def test_loss_series_names_feature_terms_and_leaves_out_a_term_equal_to_the_total():
    history = [{"epoch": 1, "train_loss": 1.2, "train_ce": 1.2, "train_rkd_angle": 0.3, "train_accuracy": 0.4},
               {"epoch": 2, "train_loss": 0.8, "train_ce": 0.7, "train_rkd_angle": 0.2, "train_accuracy": 0.6}]
    assert list(loss_series(history)) == ["total", "ce", "rkd_angle"]
    plain = [{"epoch": e, "train_loss": 1.0 / e, "train_ce": 1.0 / e} for e in (1, 2)]  # a cross-entropy run
    assert list(loss_series(plain)) == ["total"]


def test_loss_series_skips_missing_and_non_finite_points_quietly():
    history = [{"epoch": 1, "train_loss": 1.0, "train_kd": math.nan}, {"epoch": 2, "train_loss": None, "train_kd": 0.5},
               {"train_loss": 0.3}, {"epoch": 3, "train_loss": True}, "not a row", {"epoch": 4, "train_loss": 0.2}]
    series = loss_series(history)
    assert series["total"] == ([1, 4], [1.0, 0.2])
    assert series["kd"] == ([2], [0.5])
    assert history_series(history, "val_accuracy") == ([], [])


def test_plot_history_draws_each_loss_term_as_its_own_line(drawn, tmp_path):
    path = plot_history(kd_history(), tmp_path / "training_curves.png", title="kd")
    assert_png(path)
    loss_ax, acc_ax = drawn[0].axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train loss", "train ce", "train kd", "val loss (CE)"]
    kd = loss_ax.get_lines()[2]
    assert list(kd.get_ydata()) == [3.0, 1.5, 1.0]
    assert len({line.get_linestyle() for line in loss_ax.get_lines()[:3]}) == 3  # total solid, terms dashed apart
    assert [line.get_label() for line in acc_ax.get_lines()] == ["train", "val"]
    assert [t for t in loss_ax.get_xticks() if loss_ax.get_xlim()[0] <= t <= loss_ax.get_xlim()[1]] == [1, 2, 3]


def test_plot_history_copes_with_a_history_without_validation(drawn, tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5} for e in (1, 2)]
    assert_png(plot_history(history, tmp_path / "curves.png"))
    loss_ax, acc_ax = drawn[0].axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train loss"]
    assert [line.get_label() for line in acc_ax.get_lines()] == ["train"]


def test_loss_scale_turns_logarithmic_only_for_a_wide_positive_range():
    fig, ax = plt.subplots()
    try:
        assert loss_scale(ax, [0.5, 2.0, 4.0]) == "loss" and ax.get_yscale() == "linear"
        assert loss_scale(ax, [-0.1, 20.0]) == "loss"  # a negative term (a contrastive bound) stays linear
        assert loss_scale(ax, [0.001, 20.0]) == "loss (log scale)" and ax.get_yscale() == "log"
    finally:
        plt.close(fig)


def test_draw_confusion_writes_counts_or_row_fractions():
    fig, (a, b) = plt.subplots(1, 2)
    try:
        draw_confusion(a, [[3, 1], [0, 4]], ["x", "y"], normalise=False, text="counts")
        draw_confusion(b, [[3, 1], [0, 4]], ["x", "y"], normalise=True, text="fractions")
        assert [t.get_text() for t in a.texts] == ["3", "1", "4"]  # empty cells stay blank
        assert [t.get_text() for t in b.texts] == ["0.75", "0.25", "1.00"]
        with pytest.raises(KdqError, match="counts' or 'fractions'"):
            draw_confusion(a, [[1]], ["x"], text="percent")
    finally:
        plt.close(fig)


def test_plot_confusion_still_writes_one_row_normalised_panel(drawn, tmp_path):
    assert_png(plot_confusion([[5, 1], [2, 8]], ["a", "b"], tmp_path / "cm.png", title="cm"))
    (ax,) = drawn[0].axes
    assert [t.get_text() for t in ax.texts] == ["5", "1", "2", "8"]
    assert ax.get_images()[0].get_array()[1, 1] == pytest.approx(0.8)
