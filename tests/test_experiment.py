"""The experiment summary: comparisons worded in the direction the numbers go, latency with its spread."""

from __future__ import annotations

from kdq.config import Experiment
from kdq.experiment import student_vs_teacher, summarize

ENV = {"device": "test cpu", "device_type": "cpu", "threads": 2, "torch": "x"}


def result(params: int, size: int, latency: float, accuracy: float, iqr: float | None = 0.02) -> dict:
    r = {"arch": "m", "params": params, "size_bytes": size, "latency_ms_batch1": latency, "accuracy": accuracy,
         "throughput_per_s": 1000.0, "environment": ENV}
    if iqr is not None:
        r["latency_ms_batch1_iqr"] = iqr
    return r


def test_student_smaller_faster_less_accurate():
    phrases = student_vs_teacher(result(100, 400, 0.4, 0.90), result(1000, 4000, 0.8, 0.95))
    assert phrases == ["10.0x fewer parameters", "10.0x smaller on disk", "2.0x lower batch-1 latency",
                       "5.00 points less accurate"]


def test_student_larger_slower_more_accurate():
    # the wording that once read "-0.56 points less accurate" and "0.0x lower latency"
    phrases = student_vs_teacher(result(2600, 5200, 0.8, 0.9556), result(1000, 4000, 0.01, 0.95))
    assert phrases == ["2.6x more parameters", "1.3x larger on disk", "80.0x higher batch-1 latency",
                       "0.56 points more accurate"]


def test_equal_numbers_read_as_equal():
    phrases = student_vs_teacher(result(1000, 4000, 0.4, 0.95), result(1000, 4010, 0.4, 0.95))
    assert phrases == ["as many parameters", "the same size on disk", "the same batch-1 latency", "as accurate"]


def test_summary_table_shows_latency_spread():
    exp = Experiment(name="t", data={"name": "digits"}, stages=[], compare={"teacher": "big", "student": "small"})
    summary = summarize(exp, {"big": result(1000, 4000, 0.8, 0.95, iqr=0.04),
                              "small": result(100, 400, 0.41, 0.96, iqr=None)})  # an older run: no IQR
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in summary["table"].splitlines()]
    column = header.index("latency b=1 (ms, median ± IQR/2)")
    assert [row[column] for row in rows] == ["0.800 ± 0.020", "0.410"]
    assert "student vs teacher: 10.0x fewer parameters, 10.0x smaller on disk, 2.0x lower batch-1 latency, " \
           "1.00 points more accurate" in summary["notes"]
