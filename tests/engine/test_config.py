import os

import pytest
import torch

from kdq.engine import TrainConfig
from kdq.engine.config import FINE_TUNE_DEFAULTS, SEED_MAX
from kdq.engine.device import seed_everything
from kdq.errors import KdqError


@pytest.mark.parametrize(
    "values, words",
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"epochs": "three"}, "epochs must be an integer"),
        ({"augment": "yes"}, "augment must be true or false"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"epoch": 3}, "unknown training option 'epoch' (did you mean epochs"),
    ],
)
def test_bad_values_fail_with_one_line(values, words):
    with pytest.raises(KdqError, match=None) as info:
        TrainConfig.from_dict(values)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_round_trip():
    cfg = TrainConfig.from_dict({"epochs": 3, "lr": 0.1, "patience": 2})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay", "warmup_epochs", "mixup", "cutmix", "label_smoothing"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_infinite_and_nan_numbers_are_refused(name, value):
    with pytest.raises(KdqError) as info:
        TrainConfig.from_dict({name: value})
    assert str(info.value) == f"{name} must be a finite number, got {value}"


@pytest.mark.parametrize("values, words", [
    ({"lr": 10**400}, "lr must be a finite number"),  # an integer too large for a float
    ({"eval_batch_size": 0}, "eval_batch_size must be >= 1, got 0"),
    ({"seed": -1}, "seed must be an integer from 0 to 4294967295, got -1"),
    ({"seed": 2**32}, "seed must be an integer from 0 to 4294967295"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"device": "meta"}, "unknown device 'meta'; use auto, cpu, cuda, cuda:N or mps"),
    ({"device": "foo"}, "unknown device 'foo'"),
    ({"device": "cpu:1"}, "unknown device 'cpu:1'"),
])
def test_range_and_device_checks(values, words):
    with pytest.raises(KdqError) as info:
        TrainConfig.from_dict(values)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_largest_seed_seeds_every_epoch_generator():
    cfg = TrainConfig.from_dict({"seed": SEED_MAX, "epochs": 1000})
    # the training loop's per-epoch seed must stay within torch's range
    torch.Generator().manual_seed(cfg.seed * 1_000_003 + cfg.epochs)


def test_cuda_device_needs_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert TrainConfig.from_dict({"device": "cuda:0"}).device == "cuda:0"
    with pytest.raises(KdqError, match="'cuda:7' requested but only 1 CUDA GPU"):
        TrainConfig.from_dict({"device": "cuda:7"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KdqError, match="no CUDA GPU is visible; use --device cpu"):
        TrainConfig.from_dict({"device": "cuda"})


def test_deterministic_switches_cuda_to_deterministic_kernels(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice is kept
        seed_everything(0, deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_fine_tuning_defaults_are_the_ones_the_commands_apply():
    from kdq.stages.lowbit import fine_tune_config

    cfg = fine_tune_config({})
    assert {k: getattr(cfg, k) for k in FINE_TUNE_DEFAULTS} == FINE_TUNE_DEFAULTS
