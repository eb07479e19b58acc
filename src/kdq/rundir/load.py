"""Load any run directory (float, int8, low-bit) through one table of formats, with its data.

    run = load_run("runs/kd-int8")            # run.model, run.meta, run.data, run.format
    teacher = load_teacher("runs/teacher", data)

A run's model is scored and taught in the input units it was saved with: when the data's
normalisation differs (another subset, another split seed) the model is wrapped to re-express
its inputs, never silently fed numbers on another scale.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from kdq.data import DataBundle, load_dataset
from kdq.distill.teacher import Ensemble, ensemble_weights
from kdq.engine import predict
from kdq.errors import KdqError, short_repr
from kdq.io import load_weights, read_json, save_weights, write_json
from kdq.quant import serialize
from kdq.prune import sparse
from kdq.quant.lowbit import pack
from kdq.rundir.layout import CHECKPOINT, FORMAT, MODEL_META, WEIGHTS, read_config
from kdq.schema import Checker


# ---- a float model: model.safetensors + model.json


def save_model(run_dir: str | Path, model: nn.Module, data_meta: dict[str, Any]) -> Path:
    """Write model.safetensors and model.json: enough to rebuild the model without pickle."""
    run_dir = Path(run_dir)
    save_weights(run_dir / WEIGHTS, model.state_dict())
    meta = {"format": FORMAT, "version": 1, "architecture": getattr(model, "kdq_spec", None),
            "class": f"{type(model).__module__}.{type(model).__qualname__}",  # for messages only: never imported
            **data_meta}
    write_json(run_dir / MODEL_META, meta)
    return run_dir / WEIGHTS


def read_model_meta(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KdqError(f"run directory {str(run_dir)!r} not found; create it with `kdq train ... --out {run_dir}`")
    meta_path = run_dir / MODEL_META
    if not meta_path.exists():
        hint = " (training was interrupted: rerun the same command with --resume)" if (run_dir / CHECKPOINT).exists() else ""
        raise KdqError(f"{run_dir} holds no finished model: {MODEL_META} is missing{hint}")
    meta = read_json(meta_path, expect=dict)
    if meta.get("format") != FORMAT:
        raise KdqError(f"{meta_path} is not a kdq model description (format {short_repr(meta.get('format'))})")
    check = Checker(meta_path)
    arch = check.key(meta, "architecture")
    if arch is not None:  # None: a user's own module, loaded with module=
        check.model_spec(arch, "architecture")
    check.data_fields(meta)
    return meta


def _check_rebuildable(run_dir: Path, arch: dict[str, Any] | None, cls: Any) -> None:
    """Refuse, in one line saying how to fix it, a model this process has no registered builder for."""
    from kdq.models.registry import check_registered

    what = f" (class {short_repr(cls)})" if isinstance(cls, str) else ""
    if arch is None:
        raise KdqError(
            f"{run_dir} holds a custom model{what} built without kdq.models.create_model, so kdq cannot rebuild it; "
            "register its class with kdq.models.register_model, train it by that name and pass the registering module "
            "with `kdq --import MODULE`, or load it in Python with kdq.load_model(path, module=YourModel())"
        )
    check_registered(arch["name"], str(run_dir), cls)


def load_model(run_dir: str | Path, module: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved float model from its run directory (or load the weights into `module`).

    A pruned model stored sparse (kdq.prune.sparse) is a float model too: it loads dense.
    """
    from kdq.models import create_model
    from kdq.models.widths import check_fits

    run_dir = Path(run_dir)
    if (run_dir / sparse.MANIFEST).exists():
        return sparse.load_sparse(run_dir, module), sparse.read_manifest(run_dir / sparse.MANIFEST).get("meta", {})
    meta = read_model_meta(run_dir)
    if module is None:
        arch = meta.get("architecture")
        _check_rebuildable(run_dir, arch, meta.get("class"))
        try:  # a pruned model's spec carries its layer widths, each checked against the unpruned size
            module = create_model(**arch)
            if arch.get("widths"):
                check_fits(module, meta["input_shape"])
        except KdqError as err:
            raise KdqError(f"{run_dir / MODEL_META}: {err}") from None
    try:
        module.load_state_dict(load_weights(run_dir / WEIGHTS))
    except (RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise KdqError(f"weights in {run_dir / WEIGHTS} do not fit the model: {first}") from None
    return module, meta


# ---- every format a run directory's model comes in


class Format(NamedTuple):
    kind: str  # the run's kind (kdq.rundir.layout.KINDS)
    marker: str  # the file whose presence identifies the format (written last by its saver)
    tensors: str  # the weights file, measured as the model's size on disk
    read_meta: Callable[[Path], dict[str, Any]]  # the data description saved with the model
    load: Callable[[Path], nn.Module]
    runtime: str  # how it runs, as results.json reports it


def _manifest_meta(read_manifest: Callable[[Path], dict[str, Any]], name: str) -> Callable[[Path], dict[str, Any]]:
    return lambda run_dir: read_manifest(run_dir / name).get("meta", {})


# Looked up in order: a quantized or sparse run's manifest wins; a folder with none is a float
# run (whose loader then says what is missing). A sparse run is a float run stored smaller:
# its kind is "float", so quantize, qat and export take it as they take any float run.
FORMATS = (
    Format("int8", serialize.MANIFEST, serialize.TENSORS, _manifest_meta(serialize.read_manifest, serialize.MANIFEST),
           serialize.load_quantized, "pytorch-int8"),
    Format("lowbit", pack.MANIFEST, pack.TENSORS, _manifest_meta(pack.read_manifest, pack.MANIFEST),
           pack.load_packed, "pytorch-fakequant"),
    Format("float", sparse.MANIFEST, sparse.TENSORS, _manifest_meta(sparse.read_manifest, sparse.MANIFEST),
           sparse.load_sparse, "pytorch"),
    Format("float", MODEL_META, WEIGHTS, read_model_meta, lambda run_dir: load_model(run_dir)[0], "pytorch"),
)


def run_format(run_dir: str | Path) -> Format:
    """The format of the model in `run_dir`."""
    run_dir = Path(run_dir)
    return next((f for f in FORMATS if (run_dir / f.marker).exists()), FORMATS[-1])


def saved_meta(run_dir: str | Path) -> dict[str, Any]:
    """The data description saved with a run's model: model.json, or a quantized run's manifest."""
    return run_format(run_dir).read_meta(Path(run_dir))


class LoadedRun(NamedTuple):
    model: nn.Module  # in the units it was saved with (see renormalized)
    meta: dict[str, Any]  # its data description: dataset, classes, mean, std, input_shape
    data: DataBundle
    format: Format


def load_run(run_dir: str | Path, data: str | DataBundle | None = None) -> LoadedRun:
    """Any run's model, its data description, and the data (its own, or `data` checked against it)."""
    run_dir = Path(run_dir)
    fmt = run_format(run_dir)
    meta = fmt.read_meta(run_dir)  # a missing or unfinished run fails here, by name
    bundle = run_data(run_dir, data, meta)
    return LoadedRun(fmt.load(run_dir), meta, bundle, fmt)


# ---- the data a run was trained on


def resolve_data(data: str | DataBundle, **options: Any) -> tuple[DataBundle, dict[str, Any]]:
    """A DataBundle and the record of how to load it again (for config.yaml)."""
    if isinstance(data, DataBundle):
        return data, {"name": data.name, **data.options}
    options = {k: v for k, v in options.items() if v is not None}
    if "data_dir" in options:
        options["data_dir"] = str(options["data_dir"])
    return load_dataset(data, **options), {"name": data, **options}


def data_record(data: DataBundle) -> dict[str, Any]:
    """The data set's name plus load options, so later commands load the same data."""
    return resolve_data(data)[1]


def data_meta(data: DataBundle) -> dict[str, Any]:
    """What a saved model needs to know about its inputs and outputs."""
    return {
        "dataset": data.name,
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        "input_shape": list(data.input_shape),
    }


def _data_options(run_dir: Path, data: str | DataBundle) -> dict[str, Any]:
    """Reuse the run's own data options (data dir, split seed, subset) when it is the same data set."""
    if isinstance(data, DataBundle):
        return {}
    recorded = dict(read_config(run_dir).get("data", {}))
    return {k: v for k, v in recorded.items() if k != "name"} if recorded.get("name") == data else {}


def run_data(run_dir: str | Path, data: str | DataBundle | None, meta: dict[str, Any] | None = None) -> DataBundle:
    """The data set a run directory was trained on (with its own options), or `data`, checked
    against the run's saved data description (`meta` when the caller has read it already)."""
    run_dir = Path(run_dir)
    if data is None:
        data = read_config(run_dir).get("data", {}).get("name")
        if data is None:
            raise KdqError(f"{run_dir} does not record its data set; pass --data NAME")
    bundle, _ = resolve_data(data, **_data_options(run_dir, data))
    check_data_match(saved_meta(run_dir) if meta is None else meta, bundle, run_dir)
    return bundle


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


# ---- the input units a model was saved with


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


def renormalized(model: nn.Module, meta: dict[str, Any], data: DataBundle) -> nn.Module:
    """`model` taking `data`-normalised inputs: wrapped when its saved normalisation differs."""
    if _same_units(meta, data):
        return model
    return _Renormalize(model, *_unit_change(data, meta, len(data.input_shape) + 1))


class _Renormalize(nn.Module):
    def __init__(self, model: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.model = model

    @property
    def kdq_wrapped(self) -> nn.Module:  # feature taps look through the wrapper (kdq.distill.teacher.unwrap)
        return self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


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


# ---- a teacher


def load_teacher(teacher: str | Path | nn.Module, data: DataBundle) -> nn.Module:
    """A teacher from a run directory (float, int8 or low-bit) or a module, checked against the data.

    A run directory's model must have been trained on data like `data`: the same classes,
    input shape (so channel count) and, where model.json records it, the same data set.
    A module must take `data`'s inputs and give one logit per class. An int8 or low-bit run
    teaches as it deploys (the teacher-assistant chain's assistants).
    """
    if isinstance(teacher, nn.Module):
        _check_teacher_module(teacher, data)
        return teacher
    fmt = run_format(teacher)
    meta = fmt.read_meta(Path(teacher))
    check_data_match(meta, data, teacher, same_dataset=True, fix=f"train a teacher on {data.name} first")
    return renormalized(fmt.load(Path(teacher)), meta, data)


def load_teachers(teachers: str | Path | nn.Module | Sequence[str | Path | nn.Module], data: DataBundle,
                  weights: Sequence[float] | None = None) -> nn.Module:
    """One teacher (load_teacher), or several as one Ensemble: the weighted mean of their logits.

    Each may be a run directory of any format or a module; the weights (one per teacher, >= 0,
    not all 0; equal when None) are checked before any teacher is loaded.
    """
    given = [teachers] if isinstance(teachers, (str, Path, nn.Module)) else list(teachers)
    if not given:
        raise KdqError("no teacher given; pass a run directory (--teacher DIR), or several")
    ensemble_weights(weights, len(given))
    loaded = [load_teacher(t, data) for t in given]
    return loaded[0] if len(loaded) == 1 else Ensemble(loaded, weights)


def _check_teacher_module(teacher: nn.Module, data: DataBundle) -> None:
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
