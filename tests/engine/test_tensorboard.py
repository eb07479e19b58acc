"""`log: tensorboard`: event files in the run directory holding every epoch's scalars, refused
in one line when misused, and never changing what is trained."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

import kdq
from kdq.cli import main
from kdq.engine import TrainConfig, distributed, fit, tracking
from kdq.errors import KdqError
from kdq.rundir.claim import clear_run
from tests.conftest import TinyNet

pytest.importorskip("tensorboard")  # `make test` installs kdq[tensorboard]
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

FAST = dict(batch_size=64, lr=0.1, progress=False, warmup_epochs=0.0, device="cpu")


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in run_dir/tensorboard: [(step, value), ...]."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_event_files_hold_every_epoch_scalar(toy_data, tmp_path):
    torch.manual_seed(0)
    fit(TinyNet(), toy_data, TrainConfig(epochs=2, log="tensorboard", log_every=2, **FAST), tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    scalars, metrics = _scalars(tmp_path), _metrics(tmp_path)
    for tag, key in [("train/loss", "train_loss"), ("train/ce", "train_ce"), ("train/accuracy", "train_accuracy"),
                     ("val/accuracy", "val_accuracy"), ("val/loss", "val_loss"), ("train/lr", "lr"),
                     ("speed/images_per_s", "images_per_s")]:
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([m[key] for m in metrics], rel=1e-6), tag
    # the batch loss every 2 steps: 3 batches of 64 in 192 images, so global steps 2, 4, 6
    assert [step for step, _ in scalars["step/loss"]] == [2, 4, 6]


def test_every_loss_term_is_a_scalar(toy_data, tmp_path):
    def objective(logits, targets, inputs, indices):
        ce = torch.nn.functional.cross_entropy(logits, targets)
        return {"loss": ce + 0.0 * logits.pow(2).mean(), "ce": ce, "penalty": logits.pow(2).mean()}

    fit(TinyNet(), toy_data, TrainConfig(epochs=1, log="tensorboard", **FAST), tmp_path, objective=objective)
    scalars = _scalars(tmp_path)
    assert {"train/loss", "train/ce", "train/penalty"} <= scalars.keys()
    assert "step/loss" not in scalars  # per-epoch only unless log_every asks


def test_logging_leaves_the_trained_weights_unchanged(toy_data, tmp_path):
    states = []
    for log in ({}, {"log": "tensorboard", "log_every": 1}):
        torch.manual_seed(0)
        model = TinyNet()
        fit(model, toy_data, TrainConfig(epochs=2, **FAST, **log), tmp_path / str(len(states)))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not (tmp_path / "0" / "tensorboard").exists() and (tmp_path / "1" / "tensorboard").is_dir()


def test_bad_log_value_refused_in_one_line(capsys):
    with pytest.raises(KdqError, match=r"^log must be one of none, tensorboard, got 'wandb'$"):
        TrainConfig(log="wandb")
    code = main(["train", "--model", "cnn-tiny", "--data", "digits", "--log", "wandb", "--out", "unused"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "log must be one of none, tensorboard" in err, err


@pytest.mark.parametrize("options, message", [
    ({"log_every": 5}, "log_every needs a logger"),
    ({"log": "tensorboard", "log_every": 0}, "log_every must be >= 1"),
])
def test_bad_log_every_refused(options, message):
    with pytest.raises(KdqError, match=message):
        TrainConfig(**options)


def test_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(KdqError, match=r"pip install 'kdq\[tensorboard\]'") as caught:
        TrainConfig(log="tensorboard")
    assert "\n" not in str(caught.value)
    # and where the package is found but cannot be imported
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(KdqError, match=r"pip install 'kdq\[tensorboard\]'"):
        tracking.open_tracker("tensorboard", "unused")


def test_logging_needs_a_run_directory(toy_data):
    with pytest.raises(KdqError, match="writes its files into the run directory"):
        fit(TinyNet(), toy_data, TrainConfig(epochs=1, log="tensorboard", **FAST))


def test_only_the_primary_rank_writes_events(toy_data, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_primary", lambda: False)
    tmp_path.mkdir(exist_ok=True)
    fit(TinyNet(), toy_data, TrainConfig(epochs=1, log="tensorboard", log_every=1, **FAST), tmp_path)
    assert not (tmp_path / "tensorboard").exists()


def test_resume_may_turn_logging_on_and_overwrite_clears_it(toy_data, tmp_path):
    out = tmp_path / "run"
    kdq.train(TinyNet(), toy_data, out=out, epochs=1, **FAST)
    kdq.train(TinyNet(), toy_data, out=out, epochs=2, resume=True, log="tensorboard", **FAST)
    assert [step for step, _ in _scalars(out)["val/accuracy"]] == [2]  # the epoch trained after resuming
    clear_run(out)  # what --overwrite does first
    assert not (out / "tensorboard").exists()
