"""Speed measured robustly (medians, quartiles, a warning on a busy machine), and counting int8 weights."""

from __future__ import annotations

import itertools
import time
import warnings

import torch
from torch import nn

from kdq.engine import count_params, measure_speed
from kdq.quant import quantize_dynamic, quantize_static

QUICK = dict(min_time_s=0.05, max_time_s=0.3)


def test_speed_records_median_spread_and_counts():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    r = measure_speed(model, torch.randn(1, 64), large_batch=32, **QUICK)
    assert 0 < r["latency_ms_batch1_p25"] <= r["latency_ms_batch1"] <= r["latency_ms_batch1_p75"]
    assert r["latency_ms_batch1_iqr"] == r["latency_ms_batch1_p75"] - r["latency_ms_batch1_p25"]
    assert 0 < r["throughput_per_s_p25"] <= r["throughput_per_s"] <= r["throughput_per_s_p75"]
    assert r["latency_measurements"] >= 1 and r["throughput_measurements"] >= 1  # 5 unless a busy machine hit the cap
    assert r["throughput_batch"] == 32 and r["threads"] == torch.get_num_threads()


def test_speed_times_any_callable_with_its_repetitions():
    calls = []

    def run(batch: torch.Tensor) -> None:  # e.g. an ONNX Runtime session wrapper
        calls.append(len(batch))
        time.sleep(0.02)  # long enough for one call per timed block

    r = measure_speed(run, torch.zeros(1, 3), large_batch=8, **QUICK)
    assert 19 < r["latency_ms_batch1"] < 60 and r["latency_calls_per_measurement"] == 1
    assert calls.count(1) >= r["latency_measurements"] and calls.count(8) >= r["throughput_measurements"]
    assert r["throughput_per_s"] < 8 / 0.019


def test_noisy_timing_warns(capsys):
    durations = itertools.cycle([0.02, 0.08])  # every other call stalls, as on a busy machine

    r = measure_speed(lambda batch: time.sleep(next(durations)), torch.zeros(1, 3), large_batch=2, **QUICK)
    err = capsys.readouterr().err
    assert r["latency_ms_batch1_iqr"] / r["latency_ms_batch1"] > 0.25
    assert "kdq: warning: batch-1 latency timing is noisy" in err and "rerun on an idle machine" in err


def test_one_stalled_call_does_not_make_the_latency():
    durations = itertools.chain([0.4, 0.4], itertools.repeat(0.02))  # a busy machine, then a free one

    r = measure_speed(lambda batch: time.sleep(next(durations)), torch.zeros(1, 3), large_batch=2, **QUICK)
    # the stalls outlast max_time_s on their own; more measurements still follow them
    assert r["latency_measurements"] >= 5 and r["latency_ms_batch1"] < 100


def test_steady_timing_does_not_warn(capsys):
    measure_speed(lambda batch: time.sleep(0.012), torch.zeros(1, 3), large_batch=2, **QUICK)
    assert "warning" not in capsys.readouterr().err


def test_int8_layers_count_their_packed_weights():
    model = nn.ModuleDict({"lstm": nn.LSTM(8, 16), "gru": nn.GRU(16, 16), "fc": nn.Linear(16, 4)})
    assert count_params(quantize_dynamic(model)) == count_params(model) > 0
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        static = quantize_static(conv, torch.randn(8, 1, 8, 8), observer="minmax")
    assert count_params(static) == count_params(conv)
