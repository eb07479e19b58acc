"""kdq: turn a large, accurate network into a small, low-precision one, and prove it with numbers."""

from kdq.errors import KdqError
from kdq.data import DataBundle, list_datasets, load_dataset
from kdq.models import create_model, list_models
from kdq.distill import KDLoss
from kdq.engine import TrainConfig
from kdq.rundir.load import load_model, load_run
from kdq.stages.common import Run
from kdq.stages.train import train
from kdq.stages.distill import distill
from kdq.stages.evaluate import evaluate
from kdq.stages.quantize import quantize
from kdq.stages.qat import qat
from kdq.stages.prune import prune
from kdq.stages.export import export
from kdq.recipes import run_recipe, sweep
from kdq.config import load_experiment
from kdq.experiment import run_experiment
from kdq.report.compare import compare
from kdq.report.page import report_runs

__version__ = "0.1.0"

__all__ = [
    "KdqError", "DataBundle", "load_dataset", "list_datasets", "create_model", "list_models", "KDLoss",
    "TrainConfig", "Run", "train", "distill", "evaluate", "quantize", "qat", "prune", "export", "run_recipe", "sweep",
    "load_experiment", "run_experiment", "load_model", "load_run", "compare", "report_runs",
]
