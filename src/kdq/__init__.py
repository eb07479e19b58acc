"""kdq: turn a large, accurate network into a small, low-precision one, and prove it with numbers."""

from kdq.errors import KdqError
from kdq.data import DataBundle, list_datasets, load_dataset
from kdq.models import create_model, list_models
from kdq.distill import KDLoss
from kdq.engine import TrainConfig
from kdq.api import Run, distill, evaluate, train
from kdq.rundir import load_model

__version__ = "0.1.0"

__all__ = [
    "KdqError", "DataBundle", "load_dataset", "list_datasets", "create_model", "list_models", "KDLoss",
    "TrainConfig", "Run", "train", "distill", "evaluate", "load_model",
]
