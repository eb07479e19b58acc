"""Low-bit sweep report: seed statistics against hand-computed values, ordering, tables, figure."""

from __future__ import annotations

import math

import pytest

from kdq.errors import KdqError
from kdq.report import plot_sweep, size_table, summarize_sweep, sweep_table, weight_bits

FLOAT = 1_100_000  # float32 model size on disk, bytes


def row(recipe: str, bits: str, seed: int, accuracy: float, size: float, float_size: float | None = FLOAT) -> dict:
    r = {"recipe": recipe, "bits": bits, "seed": seed, "accuracy": accuracy, "size_bytes": size}
    if float_size is not None:
        r["float_size_bytes"] = float_size
    return r


@pytest.fixture
def rows() -> list[dict]:
    """Two recipes, bits given out of order; apprentice w4a4 has two seeds, the rest one."""
    return [
        row("apprentice", "w2a2", 0, 0.85, 80_000),
        row("apprentice", "w4a4", 0, 0.90, 150_000),
        row("qkd", "w8a8", 0, 0.93, 290_000),
        row("apprentice", "w4a4", 1, 0.92, 160_000),
        row("qkd", "w2a2", 0, 0.86, 76_000),
        row("apprentice", "w8a8", 0, 0.935, 285_000),
    ]


def _table_lines(table: str) -> list[list[str]]:
    """Cells of each body line of a Markdown table (header and separator dropped)."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


@pytest.mark.parametrize("scheme, bits", [("w16a16", 16), ("w8a8", 8), ("w4a4", 4), ("w1a2", 1), ("w2", 2), ("w2a32", 2), ("W4A4", 4)])
def test_weight_bits(scheme, bits):
    assert weight_bits(scheme) == bits


@pytest.mark.parametrize("scheme", ["a4w4", "4", "w", "w0a4", "w4a0", "w64a4", "w4a4x", "", None, 4])
def test_weight_bits_rejects_bad_scheme_in_one_line(scheme):
    with pytest.raises(KdqError) as info:
        weight_bits(scheme)
    assert "\n" not in str(info.value) and "w4a4" in str(info.value)


def test_summary_statistics_match_hand_computed(rows):
    by_key = {(s["recipe"], s["bits"]): s for s in summarize_sweep(rows)}
    two = by_key[("apprentice", "w4a4")]
    assert two["seeds"] == 2 and two["weight_bits"] == 4
    assert two["mean"] == pytest.approx(0.91)
    # sample std (ddof=1) of {0.90, 0.92}: sqrt(2 * 0.01**2 / 1) = 0.014142
    assert two["std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert two["std"] == pytest.approx(0.0141421, abs=1e-6)
    assert (two["min"], two["max"]) == (0.90, 0.92)
    assert two["accuracies"] == [0.90, 0.92]
    assert two["size_bytes"] == pytest.approx(155_000)
    one = by_key[("qkd", "w8a8")]
    assert one["seeds"] == 1 and one["std"] == 0.0 and one["mean"] == pytest.approx(0.93)


def test_summary_three_seeds():
    acc = [0.70, 0.80, 0.90]
    [s] = summarize_sweep([row("speq", "w1a2", i, a, 40_000) for i, a in enumerate(acc)])
    assert s["mean"] == pytest.approx(0.80)
    assert s["std"] == pytest.approx(0.10)  # sum of squares 0.02, / (3 - 1) -> variance 0.01
    assert s["weight_bits"] == 1


def test_summary_order_recipes_first_seen_then_high_precision_first(rows):
    order = [(s["recipe"], s["bits"]) for s in summarize_sweep(rows)]
    assert order == [
        ("apprentice", "w8a8"), ("apprentice", "w4a4"), ("apprentice", "w2a2"),
        ("qkd", "w8a8"), ("qkd", "w2a2"),
    ]


def test_summary_same_weight_bits_float_activations_first():
    bits = [s["bits"] for s in summarize_sweep([row("qkd", "w2a2", 0, 0.8, 1), row("qkd", "w2", 0, 0.85, 1), row("qkd", "w16a16", 0, 0.9, 1)])]
    assert bits == ["w16a16", "w2", "w2a2"]


def test_summary_empty_is_empty():
    assert summarize_sweep([]) == []


@pytest.mark.parametrize("bad, needle", [
    ({"recipe": "qkd", "bits": "w4a4"}, "accuracy"),
    ({"recipe": "qkd", "bits": "4bit", "accuracy": 0.9}, "w4a4"),
    ({"recipe": "qkd", "bits": "w4a4", "accuracy": 91.2}, "[0, 1]"),
])
def test_summary_names_the_bad_row(bad, needle):
    with pytest.raises(KdqError, match="row 1") as info:
        summarize_sweep([row("qkd", "w8a8", 0, 0.9, 1), bad])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_sweep_table_accuracy_delta_and_fraction(rows):
    table = sweep_table(rows, reference=0.9385)
    header = table.splitlines()[0]
    assert "Δ vs float" in header and "of float" in header
    cells = {(c[0], c[1]): c for c in _table_lines(table)}
    assert len(cells) == 5
    _, _, seeds, acc, delta, size, fraction = cells[("apprentice", "w4a4")]
    assert seeds == "2"
    assert acc == "0.9100 ± 0.0141"
    assert delta == "-2.85"  # (0.91 - 0.9385) * 100
    assert size == "151.4 KB"  # 155000 / 1024
    assert fraction == "1/7.1 of float"  # 1100000 / 155000
    assert cells[("apprentice", "w8a8")][4] == "-0.35"


def test_sweep_table_single_seed_has_no_plus_minus(rows):
    cells = {(c[0], c[1]): c for c in _table_lines(sweep_table(rows))}
    assert cells[("qkd", "w8a8")][3] == "0.9300"
    assert "±" in cells[("apprentice", "w4a4")][3]


def test_sweep_table_delta_sign_and_optional_columns():
    table = sweep_table([row("qkd", "w8a8", 0, 0.95, 290_000, float_size=None)], reference=0.94)
    assert _table_lines(table)[0][4] == "+1.00"
    assert "of float" not in table
    assert "Δ" not in sweep_table([row("qkd", "w8a8", 0, 0.95, 290_000)])
    assert _table_lines(sweep_table([row("qkd", "w8a8", 0, 0.94, 1)], reference=0.94))[0][4] == "+0.00"


def test_sweep_table_rejects_percent_reference(rows):
    with pytest.raises(KdqError, match="reference"):
        sweep_table(rows, reference=93.85)


def test_size_table_met_and_missed():
    # k/32 bounds of a 1,100,000-byte float model with 10% slack: w8 302,500; w4 151,250; w2 75,625.
    rows = [
        row("apprentice", "w8a8", 0, 0.93, 270_000),
        row("qkd", "w8a8", 0, 0.93, 280_000),    # w8 mean 275,000: met
        row("apprentice", "w4a4", 0, 0.90, 150_000),  # under 151,250: met
        row("qkd", "w2a2", 0, 0.85, 80_000),     # over 75,625: missed
    ]
    table = size_table(rows)
    assert [h.strip() for h in table.splitlines()[0].split("|")[1:-1]] == ["bits", "size", "x smaller than float", "k/32 bound (+10%)"]
    cells = _table_lines(table)
    assert [c[0] for c in cells] == ["w8a8", "w4a4", "w2a2"]
    w8, w4, w2 = cells
    assert w8[1] == "268.6 KB" and w8[2] == "4.0x" and w8[3] == "295.4 KB (met)"
    assert w4[3].endswith("(met)") and w4[2] == "7.3x"
    assert w2[3] == "73.9 KB (missed)" and w2[2] == "13.8x"


def test_size_table_without_float_size():
    cells = _table_lines(size_table([row("qkd", "w4a4", 0, 0.9, 150_000, float_size=None)]))
    assert cells == [["w4a4", "146.5 KB", "-", "-"]]


def test_plot_writes_png(rows, tmp_path):
    path = plot_sweep(rows + [row("speq", "w2", 0, 0.8, 70_000), row("speq", "w2a2", 0, 0.78, 70_000)],
                      tmp_path / "fig" / "sweep.png", reference=0.9385, title="cifar10 resnet20")
    assert path == tmp_path / "fig" / "sweep.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["sweep.png"]  # no temporary file left


@pytest.mark.parametrize("report", [sweep_table, size_table, lambda rows: plot_sweep(rows, "unused.png")])
def test_empty_input_is_a_one_line_error(report, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdqError, match="no sweep results to report") as info:
        report([])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "unused.png").exists()
