"""Training and evaluation loops."""

from kdq.engine import distributed
from kdq.engine.config import TrainConfig
from kdq.engine.device import resolve_device, seed_everything
from kdq.engine.evaluate import (
    classification_metrics, count_macs, count_params, describe_machine, device_of, environment, measure_speed, predict,
    weight_sparsity,
)
from kdq.engine.objectives import CrossEntropy, Objective
from kdq.engine.train import FitResult, fit

__all__ = [
    "TrainConfig", "FitResult", "fit", "predict", "classification_metrics", "count_params", "count_macs", "weight_sparsity",
    "device_of", "measure_speed", "environment", "describe_machine", "resolve_device", "seed_everything", "CrossEntropy", "Objective",
    "distributed",
]
