"""What long training shows while it runs: the per-batch bar on a terminal, early stopping
announced once with the epoch it keeps, only from the primary rank."""

from __future__ import annotations

import io

import pytest

from kdq.engine import TrainConfig, distributed, fit
from kdq.engine import train as train_module
from kdq.engine.config import RUN_CONTROL_KEYS
from kdq.stages import STAGES
from tests.conftest import TinyNet

FAST = dict(batch_size=64, lr=0.1, progress=False, warmup_epochs=0.0)


def _scores(monkeypatch, *values):
    """Validation accuracies the loop sees, epoch by epoch."""
    scores = iter(values)
    monkeypatch.setattr(train_module, "_val_metrics", lambda *a: (next(scores), 1.0))


def _early_stop_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("early stop")]


def test_early_stop_announced_once_with_the_epoch_it_keeps(toy_data, monkeypatch, capfd):
    _scores(monkeypatch, 0.5, 0.8712, 0.3, 0.2, 0.1, 0.9, 0.9, 0.9)
    result = fit(TinyNet(), toy_data, TrainConfig(epochs=8, patience=3, **FAST))
    assert result.stopped_early and result.epochs_run == 5 and result.best_epoch == 2
    lines = _early_stop_lines(capfd.readouterr().err)
    assert lines == ["early stop at epoch 5: no val gain for 3 epochs; keeping epoch 2 (val 0.8712)"]


def test_no_early_stop_line_when_every_epoch_runs(toy_data, monkeypatch, capfd):
    _scores(monkeypatch, 0.5, 0.4, 0.3)  # patience reached exactly at the last epoch: nothing was cut short
    result = fit(TinyNet(), toy_data, TrainConfig(epochs=3, patience=2, **FAST))
    assert not result.stopped_early
    assert _early_stop_lines(capfd.readouterr().err) == []


def test_only_the_primary_rank_announces(toy_data, monkeypatch, capfd):
    _scores(monkeypatch, 0.5, 0.4, 0.3, 0.2)
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    result = fit(TinyNet(), toy_data, TrainConfig(epochs=4, patience=1, **FAST))
    assert result.stopped_early
    err = capfd.readouterr().err
    assert _early_stop_lines(err) == [] and "epoch 1/4" not in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("progress", [True, False])
def test_the_batch_bar_shows_on_a_terminal_only_when_asked(toy_data, monkeypatch, progress):
    terminal = _Terminal()
    monkeypatch.setattr(train_module.sys, "stderr", terminal)
    fit(TinyNet(), toy_data, TrainConfig(epochs=1, **{**FAST, "progress": progress}))
    bar = "epoch 1/1:" in terminal.getvalue() and "/3 [" in terminal.getvalue()  # tqdm's "n/total [" of 3 batches
    assert bar == progress, terminal.getvalue()


def test_every_training_stage_kind_takes_the_run_controls():
    """progress, log and the rest of an experiment's `train:` reach every stage kind that trains:
    those that inherit all defaults, and the fine-tuning ones that inherit only these."""
    training = [kind for kind in STAGES if kind.yaml and kind.takes_training()]
    assert {"train", "distill", "qat", "prune", "recipe"} <= {kind.name for kind in training}
    for kind in training:
        assert kind.inherit is None or set(RUN_CONTROL_KEYS) <= set(kind.inherit), kind.name
