"""Training and evaluation loops."""

from kdq.engine import distributed
from kdq.engine.config import TrainConfig
from kdq.engine.device import resolve_device, seed_everything
from kdq.engine.evaluate import classification_metrics, count_params, describe_machine, device_of, environment, measure_speed, predict
from kdq.engine.objectives import CrossEntropy, Objective
from kdq.engine.train import FitResult, fit

__all__ = [
    "TrainConfig", "FitResult", "fit", "predict", "classification_metrics", "count_params", "device_of",
    "measure_speed", "environment", "describe_machine", "resolve_device", "seed_everything", "CrossEntropy", "Objective",
    "distributed",
]
