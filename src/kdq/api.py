"""The Python entry points: train, distill and evaluate in a few lines.

    import kdq
    data = kdq.load_dataset("fashion-mnist")
    teacher = kdq.train("resnet20", data, epochs=15, out="runs/teacher")
    student = kdq.distill("cnn-small", "runs/teacher", data, temperature=4, alpha=0.7, out="runs/kd")
    print(kdq.evaluate(student.model, data)["accuracy"])

Models may be zoo names or any `torch.nn.Module`; teachers may also be run directories.
"""

from __future__ import annotations

import io
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from kdq.data import DataBundle, Split, load_dataset
from kdq.distill import Distiller, KDLoss
from kdq.engine import distributed
from kdq.engine import (
    FitResult,
    TrainConfig,
    classification_metrics,
    count_params,
    device_of,
    environment,
    fit,
    measure_speed,
    predict,
    seed_everything,
)
from kdq.errors import KdqError, short_repr
from kdq.models import create_model
from kdq.models.registry import model_input_size
from kdq.io import save_weights, write_json
from kdq.report.plots import plot_confusion, plot_history
from kdq.rundir import (
    CONFUSION,
    WEIGHTS,
    claim,
    eval_file,
    load_model,
    read_config,
    read_model_meta,
    save_model,
    write_config,
    write_results,
)


@dataclass
class Run:
    """What a training command produced: the trained model, its directory and its results."""

    model: nn.Module
    dir: Path | None
    results: dict[str, Any]
    fit: FitResult | None = None
    config: dict[str, Any] = field(default_factory=dict)


def resolve_data(data: str | DataBundle, **options: Any) -> tuple[DataBundle, dict[str, Any]]:
    """A DataBundle and the record of how to load it again (for config.yaml)."""
    if isinstance(data, DataBundle):
        return data, {"name": data.name, **data.options}
    options = {k: v for k, v in options.items() if v is not None}
    if "data_dir" in options:
        options["data_dir"] = str(options["data_dir"])
    return load_dataset(data, **options), {"name": data, **options}


def data_meta(data: DataBundle) -> dict[str, Any]:
    """What a saved model needs to know about its inputs and outputs."""
    return {
        "dataset": data.name,
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        "input_shape": list(data.input_shape),
    }


def build_model(model: str | nn.Module, data: DataBundle, **kwargs: Any) -> nn.Module:
    """A zoo model sized for `data`, or the user's module unchanged."""
    if isinstance(model, nn.Module):
        return model
    in_channels = model_input_size(model, data.input_shape, data.name)
    return create_model(model, data.num_classes, in_channels, **kwargs)


def load_teacher(teacher: str | Path | nn.Module, data: DataBundle) -> nn.Module:
    """A teacher from a run directory (float, int8 or low-bit) or a module, checked against the data.

    A run directory's model must have been trained on data like `data`: the same classes,
    input shape (so channel count) and, where model.json records it, the same data set.
    A module must take `data`'s inputs and give one logit per class.
    """
    if isinstance(teacher, nn.Module):
        shape = shape_text(data.input_shape)
        try:
            out = predict(teacher, data.val.x[:2])
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise KdqError(
                f"the teacher module does not take {data.name} inputs of shape {shape} ({first}); "
                f"use a teacher trained on {data.name}"
            ) from None
        if out.dim() != 2 or out.shape[1] != data.num_classes:
            got = f"{out.shape[1]} classes" if out.dim() == 2 else f"logits of shape {tuple(out.shape)}"
            raise KdqError(
                f"the teacher outputs {got} but {data.name} has {data.num_classes} classes; "
                f"use a teacher trained on {data.name}"
            )
        return teacher
    fmt = _quantized_format(Path(teacher))
    if fmt is not None:  # an int8 or low-bit run teaches as it deploys (the chain's assistants)
        model, meta, _ = _load_quantized_run(Path(teacher), fmt, data)
    else:
        model, meta = load_model(teacher)
    check_data_match(meta, data, teacher, same_dataset=True, fix=f"train a teacher on {data.name} first")
    return _renormalized(model, meta, data)


def shape_text(shape: Any) -> str:
    """An input shape as kdq prints it: 1x28x28, or 20 features."""
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return "x".join(map(str, shape)) + (" features" if len(shape) == 1 else "")
    return "unrecorded" if shape is None else short_repr(shape)


def check_data_match(
    meta: dict[str, Any],
    data: DataBundle,
    source: str | Path,
    *,
    same_dataset: bool = False,
    fix: str | None = None,
) -> None:
    """Refuse `data` for a model saved with `meta` unless its classes, input shape and channels match.

    With `same_dataset`, the data set's name must match too where `meta` records one (a teacher
    trained on MNIST is refused for another 10-class grey data set). One KdqError line names
    both data sets and shapes.
    """
    saved_classes, saved_shape, saved_name = meta.get("classes"), meta.get("input_shape"), meta.get("dataset")
    differs = []
    if not isinstance(saved_classes, list) or saved_classes != list(data.classes):
        differs.append("classes")
    if saved_shape is not None and (not isinstance(saved_shape, list) or saved_shape != list(data.input_shape)):
        differs.append("input shape")
    channels = [k for k in ("mean", "std") if not isinstance(meta.get(k), list) or len(meta[k]) != len(data.mean)]
    if channels and "input shape" not in differs:
        differs.append("channels")
    if same_dataset and isinstance(saved_name, str) and saved_name != data.name:
        differs.append("data set")
    if differs:
        n_saved = len(saved_classes) if isinstance(saved_classes, list) else "?"
        name = saved_name if isinstance(saved_name, str) and len(saved_name) <= 60 else "unrecorded"
        raise KdqError(
            f"{source} was trained on {name!r} (input {shape_text(saved_shape)}, {n_saved} classes) "
            f"but the data is {data.name!r} (input {shape_text(list(data.input_shape))}, {data.num_classes} classes): "
            f"different {' and '.join(differs)}; "
            f"{fix or f'pass the data set it was trained on (--data {name})'}"
        )


def _same_units(meta: dict[str, Any], data: DataBundle) -> bool:
    return list(meta.get("mean", [])) == list(data.mean) and list(meta.get("std", [])) == list(data.std)


def _unit_change(data: DataBundle, meta: dict[str, Any], ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) taking `data`-normalised inputs to the units the model was saved with.

    One mean and std per channel (or feature) on both sides, never broadcast: a 1-channel data
    set fed to a 3-channel model is refused, not copied into every channel.
    """
    for key in ("mean", "std"):
        saved = meta.get(key)
        if not isinstance(saved, list) or len(saved) != len(data.mean):
            n = len(saved) if isinstance(saved, list) else "no"
            raise KdqError(
                f"the model was saved for {n} input channels ({key}) but {data.name} has {len(data.mean)}; "
                f"use the data set it was trained on"
            )
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in saved) or (
            key == "std" and not all(v > 0 for v in saved)
        ):
            raise KdqError(f"the model's saved {key} {short_repr(saved)} is not a list of finite numbers"
                           f"{' > 0' if key == 'std' else ''}; the run directory is damaged, retrain it")
    shape = (1, -1) + (1,) * (ndim - 2)
    t = lambda v: torch.tensor(v, dtype=torch.float32).reshape(shape)  # noqa: E731
    return t(data.std) / t(meta["std"]), (t(data.mean) - t(meta["mean"])) / t(meta["std"])


def _renormalized(model: nn.Module, meta: dict[str, Any], data: DataBundle) -> nn.Module:
    """Wrap a model whose saved normalisation differs from the data's (other split, other seed)."""
    if _same_units(meta, data):
        return model
    return _Renormalize(model, *_unit_change(data, meta, len(data.input_shape) + 1))


class _Renormalize(nn.Module):
    def __init__(self, model: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


def train(
    model: str | nn.Module,
    data: str | DataBundle = "fashion-mnist",
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    data_options: dict[str, Any] | None = None,
    **options: Any,
) -> Run:
    """Train a model with cross-entropy; options are TrainConfig fields (epochs, lr, ...).

    `out` must be new or empty, unless `resume` continues the run there (with the same model,
    optimizer and data) or `overwrite` replaces it; see kdq.rundir.claim.
    """
    cfg = TrainConfig.from_dict(options)
    bundle, data_record = resolve_data(data, **(data_options or {}))
    seed_everything(cfg.seed, cfg.deterministic)  # the initial weights follow --seed
    net = build_model(model, bundle, **(model_kwargs or {}))
    record = {"command": "train", "data": data_record, "model": _spec(net), "train": cfg.to_dict()}
    return _train_and_report(net, bundle, cfg, out, record, objective=None, resume=resume, overwrite=overwrite)


def distill(
    student: str | nn.Module,
    teacher: str | Path | nn.Module,
    data: str | DataBundle = "fashion-mnist",
    *,
    temperature: float = 4.0,
    alpha: float = 0.7,
    teacher_mode: str = "online",
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    data_options: dict[str, Any] | None = None,
    **options: Any,
) -> Run:
    """Hinton distillation of `teacher` into `student` (see kdq.distill.KDLoss)."""
    loss = KDLoss(temperature, alpha, options.get("label_smoothing", 0.0))
    cfg = TrainConfig.from_dict(options)
    if teacher_mode == "cached" and (cfg.mixup > 0 or cfg.cutmix > 0):
        raise KdqError("a cached teacher cannot score mixed images; use teacher_mode='online' with mixup/cutmix")
    bundle, data_record = resolve_data(data, **(data_options or {}))
    teacher_net = load_teacher(teacher, bundle)
    seed_everything(cfg.seed, cfg.deterministic)  # the initial weights follow --seed
    net = build_model(student, bundle, **(model_kwargs or {}))
    objective = Distiller(teacher_net, loss, teacher_mode, cfg.eval_batch_size)
    record = {
        "command": "distill",
        "data": data_record,
        "model": _spec(net),
        "train": cfg.to_dict(),
        "distill": {
            "teacher": str(teacher) if not isinstance(teacher, nn.Module) else type(teacher).__name__,
            "temperature": temperature,
            "alpha": alpha,
            "teacher_mode": teacher_mode,
        },
    }
    return _train_and_report(net, bundle, cfg, out, record, objective=objective, resume=resume, overwrite=overwrite)


def _spec(model: nn.Module) -> dict[str, Any]:
    return getattr(model, "kdq_spec", None) or {"name": None, "class": type(model).__name__}


def _train_and_report(net, bundle, cfg, out, record, *, objective, resume, overwrite) -> Run:  # noqa: ANN001
    # everything is built and checked by now: only then is the run directory claimed and written
    if out is None:
        return _fit_and_score(net, bundle, cfg, None, record, objective=objective, resume=resume)
    if not distributed.is_primary():
        # under torchrun the other ranks train beside the primary and write nothing: only rank 0
        # claims the directory; they read it (a checkpoint to resume) after fit's barrier
        return _fit_and_score(net, bundle, cfg, Path(out), record, objective=objective, resume=resume)
    with claim(out, "float", record["command"], resume=resume, overwrite=overwrite, record=record) as out_dir:
        write_config(out_dir, record)
        return _fit_and_score(net, bundle, cfg, out_dir, record, objective=objective, resume=resume)


def _fit_and_score(net, bundle, cfg, out_dir, record, *, objective, resume) -> Run:  # noqa: ANN001
    start = time.perf_counter()
    result = fit(net, bundle, cfg, out_dir, objective=objective, resume=resume)
    train_time = time.perf_counter() - start
    if not distributed.is_primary():  # rank 0 scores and writes the run; here, only the fit's summary
        results = {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
                   "epochs_run": result.epochs_run, "stopped_early": result.stopped_early, "train_time_s": train_time}
        return Run(net, out_dir, results, result, record)
    if out_dir is not None:
        save_model(out_dir, net, data_meta(bundle))
        if result.history:
            plot_history(result.history, out_dir / "training_curves.png", title=str(record["model"].get("name")))
    weights = out_dir / WEIGHTS if out_dir is not None else None
    results = evaluate(net, bundle, weights=weights)
    results.update(
        best_epoch=result.best_epoch,
        best_val_accuracy=result.best_val_accuracy,
        epochs_run=result.epochs_run,
        stopped_early=result.stopped_early,
        train_time_s=train_time,
    )
    if out_dir is not None:
        record_results(out_dir, results, bundle)
    return Run(net, out_dir, results, result, record)


def record_results(run_dir: Path, results: dict[str, Any], data: DataBundle) -> None:
    """results.json and confusion_matrix.png: written once, by the command that made the run."""
    write_results(run_dir, results)
    plot_confusion(results["confusion_matrix"], list(data.classes), run_dir / CONFUSION,
                   title=f"{data.name} {results['split']}: accuracy {results['accuracy']:.4f}")


def evaluate(
    model: nn.Module | str | Path,
    data: str | DataBundle | None = None,
    *,
    out: str | Path | None = None,
    split: str = "test",
    speed: bool = True,
    weights: Path | None = None,
) -> dict[str, Any]:
    """Accuracy (overall, top-5, per class), confusion matrix, params, size on disk, speed.

    `model` is a module or a run directory; with a run directory and no `data`, the data set
    it was trained on is used. A run directory's evaluation is written beside it (or in `out`)
    as eval-<split>.json, eval-<data>-<split>.json when `data` is given (kdq.rundir.eval_file),
    with its confusion matrix as a PNG of the same name; the run's own results.json, written
    by the command that made it, is never touched. A module's is written only with `out`.
    `weights` names the module's saved weights file, for the size on disk.
    """
    weights_path = weights
    float_params = None
    runtime = "pytorch"
    if not isinstance(model, nn.Module):
        run_dir = Path(model)
        saved = _quantized_format(run_dir)
        if saved is not None:  # an int8 or low-bit run: scored in its float model's input units
            qmodel, meta, bundle = _load_quantized_run(run_dir, saved, data)
            model = _renormalized(qmodel, meta, bundle)
            weights_path = run_dir / saved.tensors
            float_params = meta.get("float_params")
            runtime = saved.runtime
        else:
            read_model_meta(run_dir)  # a missing or unfinished run fails here, by name
            bundle = _run_data(run_dir, data)
            # _run_data checked classes and input shape; another data set's name is allowed here
            model = _renormalized(*load_model(run_dir), bundle)
            weights_path = run_dir / WEIGHTS
        out = run_dir if out is None else out
        name = eval_file(split, None if data is None else bundle.name)
    else:
        name = eval_file(split)
        if data is None:
            raise KdqError("evaluate needs data when given a module: kdq.evaluate(model, data)")
        bundle, _ = resolve_data(data)
    if split not in ("test", "val", "train"):
        raise KdqError(f"split must be test, val or train, got {split!r}")
    part: Split = getattr(bundle, split)

    device = device_of(model)
    logits = predict(model, part.x.to(device))
    results: dict[str, Any] = {"runtime": runtime, "dataset": bundle.name, "split": split}
    results.update(classification_metrics(logits, part.y, list(bundle.classes)))
    # int8 modules hold packed weights, not parameters: report the float model's count
    results["params"] = float_params if float_params is not None else count_params(model)
    results["size_bytes"] = _size_on_disk(model, weights_path)
    if speed:
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        model.eval()
        results.update(measure_speed(model, part.x[:1].to(device), synchronize=sync))
    results["environment"] = environment(device)
    if out is not None:
        path = write_json(Path(out) / name, results)
        plot_confusion(results["confusion_matrix"], list(bundle.classes), path.with_suffix(".png"),
                       title=f"{bundle.name} {split}: accuracy {results['accuracy']:.4f}")
    return results


def _data_options(run_dir: Path, data: str | DataBundle) -> dict[str, Any]:
    """Reuse the run's own data options (data dir, split seed, subset) when it is the same data set."""
    if isinstance(data, DataBundle):
        return {}
    recorded = dict(read_config(run_dir).get("data", {}))
    return {k: v for k, v in recorded.items() if k != "name"} if recorded.get("name") == data else {}


def _size_on_disk(model: nn.Module, weights_path: Path | None) -> int:
    """Bytes of the saved safetensors weights (saved to a temporary file when not on disk yet).

    A quantized module is measured as kdq saves it: int8 values, scales and zero points.
    """
    if weights_path is not None and weights_path.exists():
        return weights_path.stat().st_size
    from kdq.quant.serialize import decompose_state

    if getattr(model, "kdq_lowbit", None) is not None and getattr(model, "kdq_spec", None):
        from kdq.quant.lowbit import pack

        with tempfile.TemporaryDirectory() as tmp:  # its weights at their real bit width
            return (pack.save_packed(model, tmp) / pack.TENSORS).stat().st_size
    try:
        tensors = decompose_state(model)[0]
    except KdqError:
        # State kdq cannot store (another library's packed type): measured, never loaded, through
        # torch's own format, so evaluation still reports a size.
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return buffer.getbuffer().nbytes
    with tempfile.TemporaryDirectory() as tmp:
        return save_weights(Path(tmp) / WEIGHTS, tensors).stat().st_size


class _QuantizedFormat(NamedTuple):
    kind: str  # "int8" (kdq quantize / qat) or "lowbit" (kdq qat --bits)
    manifest: str
    tensors: str
    load: Callable[[Path], nn.Module]
    runtime: str


def _quantized_format(run_dir: Path) -> _QuantizedFormat | None:
    """How the quantized model in `run_dir` is stored, or None for a float run."""
    from kdq.quant import serialize
    from kdq.quant.lowbit import pack

    for fmt in (_QuantizedFormat("int8", serialize.MANIFEST, serialize.TENSORS, serialize.load_quantized, "pytorch-int8"),
                _QuantizedFormat("lowbit", pack.MANIFEST, pack.TENSORS, pack.load_packed, "pytorch-fakequant")):
        if (run_dir / fmt.manifest).exists():
            return fmt
    return None


def _load_quantized_run(
    run_dir: Path, fmt: _QuantizedFormat, data: str | DataBundle | None
) -> tuple[nn.Module, dict[str, Any], DataBundle]:
    """The quantized model, its float model's metadata, and the data, checked to have its classes."""
    meta = _manifest_meta(run_dir, fmt)
    bundle = _run_data(run_dir, data, meta)  # checks the data against this same meta
    return fmt.load(run_dir), meta, bundle


def _run_data(run_dir: Path, data: str | DataBundle | None, meta: dict[str, Any] | None = None) -> DataBundle:
    """The data set a run directory was trained on (with its own options), or `data`, checked
    against the run's saved data description (`meta` when the caller has read it already)."""
    if data is None:
        data = read_config(run_dir).get("data", {}).get("name")
        if data is None:
            raise KdqError(f"{run_dir} does not record its data set; pass --data NAME")
    bundle, _ = resolve_data(data, **_data_options(run_dir, data))
    check_data_match(saved_meta(run_dir) if meta is None else meta, bundle, run_dir)
    return bundle


def saved_meta(run_dir: Path) -> dict[str, Any]:
    """The data description saved with a run's model: model.json, or a quantized run's manifest."""
    fmt = _quantized_format(run_dir)
    if fmt is None:
        return read_model_meta(run_dir)
    return _manifest_meta(run_dir, fmt)


def _manifest_meta(run_dir: Path, fmt: _QuantizedFormat) -> dict[str, Any]:
    """The `meta` of a quantized run's manifest, read through its format's checks."""
    from kdq.quant import serialize
    from kdq.quant.lowbit import pack

    read = serialize.read_manifest if fmt.kind == "int8" else pack.read_manifest
    return read(run_dir / fmt.manifest).get("meta", {})


def renormalize(x: torch.Tensor, data: DataBundle, meta: dict[str, Any]) -> torch.Tensor:
    """Re-express `data`-normalised inputs in the units of a model saved with `meta`'s mean/std."""
    if _same_units(meta, data):
        return x
    scale, shift = _unit_change(data, meta, x.dim())
    return x * scale + shift


def check_calibration(batches: int, batch_size: int) -> None:
    """Both counts are integers >= 1 (a negative size would take a slice from the end)."""
    for what, value in (("batches", batches), ("batch size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KdqError(f"calibration {what} must be >= 1, got {value!r} (--calibration-{what.replace(' ', '-')})")


def calibration_set(data: DataBundle, meta: dict[str, Any], batches: int, batch_size: int) -> torch.Tensor:
    """The first `batches * batch_size` training inputs, clamped (with a warning) to what exists."""
    check_calibration(batches, batch_size)
    wanted = batches * batch_size
    if wanted > len(data.train):
        print(f"kdq: warning: {batches} calibration batches of {batch_size} exceed the {len(data.train)} "
              "training samples; using all of them", file=sys.stderr)
    return renormalize(data.train.x[:wanted], data, meta)


def export(
    run: str | Path,
    out: str | Path,
    *,
    int8: bool = False,
    calibration_batches: int = 32,
    batch_size: int = 128,
    calibrate_method: str = "minmax",
    activation_type: str = "uint8",
    data: str | DataBundle | None = None,
    format: str = "onnx",  # noqa: A002 - the CLI flag's name
) -> dict[str, Any]:
    """Export a run directory's model to ONNX, or a low-bit run to one packed safetensors file.

    A float run gives a float file, checked on the whole test set: ONNX Runtime must make the
    same prediction as PyTorch on at least 99.9% of it. With `int8`, that file is then quantized
    by ONNX Runtime (QDQ, calibrated on training data) and its test accuracy is reported next to
    the float model's. An int8 run (from `kdq quantize` or `kdq qat`) is written as QDQ with its
    own scales, so QAT's learned quantization is kept; its accuracy is reported next to PyTorch
    int8's, with how often the two runtimes agree.
    """
    from kdq.deploy import OrtModel, check_agreement, export_onnx, quantize_onnx_static
    from kdq.deploy.onnx_export import MIN_FLOAT_AGREEMENT

    run_dir, out = Path(run), Path(out)
    if format not in ("onnx", "packed"):
        raise KdqError(f"format must be onnx or packed, got {format!r}")
    if int8:
        check_calibration(calibration_batches, batch_size)  # before the float file is written
    saved = _quantized_format(run_dir)
    kind = saved.kind if saved is not None else "float"
    if format == "packed":
        if kind != "lowbit":
            raise KdqError(f"{run_dir} is not a low-bit run; --format packed exports runs made by `kdq qat --bits`")
        from kdq.quant.lowbit.pack import export_packed_file

        export_packed_file(run_dir, out)
        return {"packed": str(out), "size_bytes": out.stat().st_size}
    if kind == "lowbit":
        raise KdqError(f"{run_dir} is a low-bit run; export it with --format packed (ONNX has no low-bit kernels)")
    if kind == "int8":
        return _export_int8_run(run_dir, saved, out, data)
    model, meta = load_model(run_dir)
    bundle = _run_data(run_dir, data)
    test_x = renormalize(bundle.test.x, bundle, meta)
    float_path = out if not int8 else out.with_name(out.stem + ".float.onnx")
    export_onnx(model, test_x[:2], float_path, meta=meta, verify=False)
    try:
        agreement = check_agreement(model, OrtModel(float_path), test_x)
    except KdqError:
        float_path.unlink(missing_ok=True)  # a file ONNX Runtime cannot run is no export
        raise
    if agreement["agreement"] < MIN_FLOAT_AGREEMENT:
        float_path.unlink(missing_ok=True)
        raise KdqError(f"ONNX Runtime agrees with PyTorch on only {agreement['agreement']:.2%} of the test set; export refused")
    info: dict[str, Any] = {"float_onnx": str(float_path), "float_agreement": agreement["agreement"],
                            "float_max_abs_diff": agreement["max_abs_diff"]}
    if int8:
        calib = calibration_set(bundle, meta, calibration_batches, batch_size)
        quantize_onnx_static(float_path, calib, out, calibrate_method=calibrate_method, activation_type=activation_type)
        info.update(
            int8_onnx=str(out),
            int8_source="onnxruntime static quantization",
            calibration_samples=len(calib),
            float_accuracy=_accuracy(predict(model, test_x), bundle.test.y),
            int8_accuracy=_accuracy(OrtModel(out).predict(test_x), bundle.test.y),
            float_size_bytes=float_path.stat().st_size,
            int8_size_bytes=out.stat().st_size,
        )
    return info


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1).cpu() == y.cpu()).float().mean().item()


def _export_int8_run(run_dir: Path, fmt: _QuantizedFormat, out: Path, data: str | DataBundle | None) -> dict[str, Any]:
    from kdq.deploy import OrtModel, export_onnx

    qmodel, meta, bundle = _load_quantized_run(run_dir, fmt, data)
    test_x = renormalize(bundle.test.x, bundle, meta).cpu()  # PyTorch int8 kernels are CPU kernels
    export_onnx(qmodel, test_x[:2], out, meta=meta)
    torch_logits, ort_logits = predict(qmodel, test_x), OrtModel(out).predict(test_x)
    return {
        "int8_onnx": str(out),
        "int8_source": f"carried over from the {qmodel.kdq_quant['kind']} model's scales",
        "pytorch_int8_accuracy": _accuracy(torch_logits, bundle.test.y),
        "int8_accuracy": _accuracy(ort_logits, bundle.test.y),
        "int8_agreement": (torch_logits.argmax(1) == ort_logits.argmax(1)).float().mean().item(),
        "int8_size_bytes": out.stat().st_size,
    }


def evaluate_onnx_file(path: str | Path, data: str | DataBundle | None = None, *, speed: bool = True) -> dict[str, Any]:
    """`kdq evaluate model.onnx`: run it with ONNX Runtime on the test set of its data set."""
    from kdq.deploy import evaluate_onnx, load_onnx

    path = Path(path)
    _, meta = load_onnx(path)
    bundle, _ = resolve_data(data if data is not None else meta["dataset"])
    x = renormalize(bundle.test.x, bundle, meta)
    results = evaluate_onnx(path, x, bundle.test.y, list(bundle.classes), speed=speed)
    results["split"] = "test"
    stem = path.with_suffix("")
    write_json(stem.with_name(stem.name + ".results.json"), results)
    plot_confusion(results["confusion_matrix"], list(bundle.classes), stem.with_name(stem.name + ".confusion_matrix.png"),
                   title=f"{path.name} ({results.get('precision')}): accuracy {results['accuracy']:.4f}")
    return results
