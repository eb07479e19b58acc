"""Python entry points for int8: post-training quantization and quantization-aware training.

    kdq.quantize("runs/kd", "runs/kd-int8", method="static", calibration_batches=32)
    kdq.qat("runs/kd", "runs/kd-qat", teacher="runs/teacher", epochs=3)

Both write a run directory holding quantized.safetensors + quantized.json (no pickle),
config.yaml and results.json; `kdq evaluate` and `kdq.evaluate` read it back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from kdq.api import _renormalized, _run_data, calibration_set, evaluate, load_teacher, record_results, resolve_data
from kdq.data import DataBundle
from kdq.distill import Distiller, KDLoss
from kdq.engine import TrainConfig, count_params, distributed, fit
from kdq.engine.config import QAT_DEFAULTS
from kdq.errors import KdqError
from kdq.quant import (
    apply_qat_freeze,
    convert_qat,
    prepare_qat,
    qat_freeze_callback,
    quantize_dynamic,
    quantize_static,
    save_quantized,
)
from kdq.quant.serialize import TENSORS
from kdq.rundir import claim, load_model, write_config

METHODS = ("static", "dynamic")


def _spec(model: nn.Module, run: Path) -> dict[str, Any]:
    spec = getattr(model, "kdq_spec", None)
    if not spec or not spec.get("name"):
        raise KdqError(f"{run} holds a custom model; int8 run directories need a zoo model (quantize it from Python instead)")
    return spec


def _data_record(data: DataBundle) -> dict[str, Any]:
    return resolve_data(data)[1]  # name plus load options, so later commands load the same data


def _finish(out: Path, qmodel: nn.Module, float_model: nn.Module, spec, meta, data) -> dict[str, Any]:  # noqa: ANN001
    """Save the int8 model and score it; the caller adds its own keys and writes results.json once."""
    save_quantized(out, spec, qmodel, meta={**meta, "float_params": count_params(float_model)})
    # in the model's own input units, exactly as `kdq evaluate` will reload and score it
    results = evaluate(_renormalized(qmodel, meta, data), data, weights=out / TENSORS)
    results.update(runtime="pytorch-int8", backend=qmodel.kdq_quant.get("backend"), params=count_params(float_model))
    return results


def quantize(
    run: str | Path,
    out: str | Path,
    *,
    method: str = "static",
    calibration_batches: int = 32,
    batch_size: int = 128,
    backend: str = "x86",
    observer: str = "histogram",
    per_channel: bool = True,
    skip: tuple[str, ...] | list[str] = (),
    data: str | DataBundle | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Post-training int8 quantization of a run directory's model into the run directory `out`.

    Calibration and evaluation use the run's own data set and options unless `data` is given.
    `out` must be new or empty unless `overwrite` replaces the run there.
    """
    if method not in METHODS:
        raise KdqError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    run, out = Path(run), Path(out)
    model, meta = load_model(run)
    spec = _spec(model, run)
    data = _run_data(run, data)
    if method == "static":
        calib = calibration_set(data, meta, calibration_batches, batch_size)
        qmodel = quantize_static(model, calib, backend=backend, observer=observer, per_channel=per_channel, skip=skip)
    else:
        qmodel = quantize_dynamic(model)
    record = {"command": "quantize", "source": str(run), "method": method, "backend": backend, "observer": observer,
              "per_channel": per_channel, "skip": list(skip), "calibration_batches": calibration_batches,
              "batch_size": batch_size, "data": _data_record(data)}
    with claim(out, "int8", "quantize", overwrite=overwrite):
        write_config(out, record)
        results = _finish(out, qmodel, model, spec, meta, data)
        record_results(out, results, data)
    return results


def qat(
    run: str | Path,
    out: str | Path,
    *,
    teacher: str | Path | nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    backend: str = "x86",
    per_channel: bool = True,
    freeze_bn_epoch: int | None = None,
    freeze_observer_epoch: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    data: str | DataBundle | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Quantization-aware fine-tuning of a run's model (optionally distilled from `teacher`), then int8.

    `out` must be new or empty, unless `resume` continues the run there or `overwrite` replaces it.
    """
    run, out = Path(run), Path(out)
    # fine-tuning: short and gentle; fp32 throughout, because fake quantization's fused observer
    # kernels reject the fp16 activations that CUDA autocast would hand them
    options = {**QAT_DEFAULTS, **options, "amp": False}
    cfg = TrainConfig.from_dict(options)
    model, meta = load_model(run)
    spec = _spec(model, run)
    data = _run_data(run, data)
    qat_model = prepare_qat(model, data.train.x[:2], backend=backend, per_channel=per_channel)
    objective = None
    if teacher is not None:
        objective = Distiller(load_teacher(teacher, data), KDLoss(temperature, alpha), "online", cfg.eval_batch_size)
    record = {"command": "qat", "source": str(run), "backend": backend, "per_channel": per_channel,
              "freeze_bn_epoch": freeze_bn_epoch, "freeze_observer_epoch": freeze_observer_epoch,
              "teacher": None if teacher is None else str(teacher), "temperature": temperature, "alpha": alpha,
              "train": cfg.to_dict(), "data": _data_record(data)}
    callback = qat_freeze_callback(qat_model, freeze_bn_epoch=freeze_bn_epoch, freeze_observer_epoch=freeze_observer_epoch)
    distributed.require_one_process("int8 QAT")
    with claim(out, "int8", "qat", resume=resume, overwrite=overwrite, record=record):
        write_config(out, record)
        start = time.perf_counter()
        result = fit(qat_model, data, cfg, out, objective=objective, resume=resume, on_epoch_start=callback)
        # restoring the best epoch's state can switch observers back on; the schedule decides
        apply_qat_freeze(qat_model, cfg.epochs, freeze_bn_epoch=freeze_bn_epoch, freeze_observer_epoch=freeze_observer_epoch)
        qmodel = convert_qat(qat_model.cpu())
        results = _finish(out, qmodel, model, spec, meta, data)
        results.update(best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy,
                       train_time_s=time.perf_counter() - start)
        record_results(out, results, data)
    return results

