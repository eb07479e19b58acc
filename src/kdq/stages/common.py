"""What every training stage shares: build, fit, evaluate once, write results once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kdq.data import DataBundle
from kdq.engine import FitResult, distributed, fit
from kdq.engine.train import read_history
from kdq.errors import KdqError
from kdq.models import create_model
from kdq.models.registry import model_input_size
from kdq.report.plots import plot_confusion, plot_history
from kdq.rundir.claim import claim
from kdq.rundir.layout import CONFUSION, CURVES, METRICS, WEIGHTS, read_results, write_config, write_results
from kdq.rundir.load import data_meta, save_model
from kdq.stages.evaluate import evaluate


@dataclass
class Run:
    """What a training command produced: the trained model, its directory and its results."""

    model: nn.Module
    dir: Path | None
    results: dict[str, Any]
    fit: FitResult | None = None
    config: dict[str, Any] = field(default_factory=dict)


def build_model(model: str | nn.Module, data: DataBundle, **kwargs: Any) -> nn.Module:
    """A zoo model sized for `data`, or the user's module unchanged."""
    if isinstance(model, nn.Module):
        return model
    in_channels = model_input_size(model, data.input_shape, data.name)
    return create_model(model, data.num_classes, in_channels, **kwargs)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """How config.yaml records a model: its zoo spec, or its class for a user's module."""
    return getattr(model, "kdq_spec", None) or {"name": None, "class": type(model).__name__}


def zoo_spec(model: nn.Module, run: Path) -> dict[str, Any]:
    """The zoo spec a quantized run rebuilds its model from; a user's own module has none."""
    spec = getattr(model, "kdq_spec", None)
    if not spec or not spec.get("name"):
        raise KdqError(f"{run} holds a custom model; int8 run directories need a zoo model (quantize it from Python instead)")
    return spec


def record_results(run_dir: Path, results: dict[str, Any], data: DataBundle, title: str = "") -> None:
    """results.json, confusion_matrix.png and, for a run that trained, training_curves.png
    (titled `title`): written once, by the command that made the run."""
    write_results(run_dir, results)
    plot_confusion(results["confusion_matrix"], list(data.classes), run_dir / CONFUSION,
                   title=f"{data.name} {results['split']}: accuracy {results['accuracy']:.4f}")
    plot_curves(run_dir, title or Path(run_dir).name)


def plot_curves(run_dir: Path, title: str) -> Path | None:
    """training_curves.png from the run's own metrics.jsonl, so every stage kind that trains
    (train, distill, int8 and low-bit QAT, prune, mutual) draws the same curves, resumed epochs
    included; None for a run that trained nothing (quantize, one-shot pruning, deploy)."""
    path = Path(run_dir) / METRICS
    history = read_history(path) if path.exists() else []
    return plot_history(history, Path(run_dir) / CURVES, title=title) if history else None


def primary_results(out: Path) -> dict[str, Any]:
    """On a rank other than the primary under torchrun: the results the primary wrote to `out`,
    once it has (so every rank returns the same, and a later stage may read its files)."""
    distributed.barrier()
    return read_results(out)


def fit_summary(result: FitResult, train_time: float) -> dict[str, Any]:
    """What results.json says about training."""
    return {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
            "epochs_run": result.epochs_run, "stopped_early": result.stopped_early, "train_time_s": train_time}


def train_and_report(net, bundle, cfg, out, record, *, objective, resume, overwrite) -> Run:  # noqa: ANN001
    """Fit a float model into run directory `out` (claimed only now: everything is built and
    checked), save it, score it and write its results."""
    if out is None:
        return _fit_and_score(net, bundle, cfg, None, record, objective=objective, resume=resume)
    # under torchrun only rank 0 claims and writes; the others train beside it and read the
    # directory (a checkpoint to resume) after fit's barrier
    claimed = claim(out, "float", record["command"], resume=resume, overwrite=overwrite, record=record)
    with distributed.primary_only(claimed, Path(out)) as out_dir:
        if distributed.is_primary():
            write_config(out_dir, record)
        return _fit_and_score(net, bundle, cfg, out_dir, record, objective=objective, resume=resume)


def _fit_and_score(net, bundle, cfg, out_dir, record, *, objective, resume) -> Run:  # noqa: ANN001
    start = time.perf_counter()
    result = fit(net, bundle, cfg, out_dir, objective=objective, resume=resume)
    train_time = time.perf_counter() - start
    if not distributed.is_primary():  # rank 0 scores and writes the run; here, only the fit's summary
        return Run(net, out_dir, fit_summary(result, train_time), result, record)
    if out_dir is not None:
        save_model(out_dir, net, data_meta(bundle))
    weights = out_dir / WEIGHTS if out_dir is not None else None
    results = evaluate(net, bundle, weights=weights)
    results.update(fit_summary(result, train_time))
    if "labeled" in record:  # --labeled: how many training images kept their labels
        results["labeled"] = record["labeled"]
    if out_dir is not None:
        record_results(out_dir, results, bundle, title=str(record["model"].get("name") or record["model"].get("class")))
    return Run(net, out_dir, results, result, record)
