"""Save and reload int8 PyTorch models without pickle: safetensors + JSON only.

Quantized tensors are stored decomposed (int8 values, scales, zero points, axis) and the
module graph is not stored at all: loading rebuilds the float zoo model from its spec, re-runs
the same quantization recipe on a dummy input, and loads the stored tensors into it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdq.errors import KdqError, short_repr
from kdq.io import load_weights, read_json, save_weights, write_json
from kdq.models import create_model
from kdq.models.registry import check_registered
from kdq.rundir.layout import INT8_MANIFEST as MANIFEST, INT8_TENSORS as TENSORS
from kdq.schema import DAMAGED, Checker

FORMAT = "kdq-int8"
# Dynamic int8 LSTM and GRU layers (their packed weights are saved as plain tensors).
_DynamicRNN = torch.ao.nn.quantized.dynamic.modules.rnn.RNNBase
# Allow-list: a manifest can name only these dtypes, never an arbitrary attribute of torch.
_QDTYPES = {"qint8": torch.qint8, "quint8": torch.quint8, "qint32": torch.qint32, "float16": torch.float16, "float32": torch.float32}


def _decompose(key: str, value: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Store `value` under `key`-prefixed plain tensors; return the JSON entry that reassembles it."""
    if isinstance(value, torch.dtype):
        return {"kind": "dtype", "dtype": str(value).removeprefix("torch.")}
    if value is None:
        return {"kind": "none"}
    if isinstance(value, tuple):  # packed params of quantized Linear: (weight, bias)
        return {"kind": "tuple", "items": [_decompose(f"{key}::{i}", v, tensors) for i, v in enumerate(value)]}
    if not isinstance(value, torch.Tensor):
        raise KdqError(f"cannot save quantized state {key!r} of type {type(value).__name__}")
    if not value.is_quantized:
        tensors[key] = value
        return {"kind": "tensor"}
    tensors[f"{key}::int"] = value.int_repr()
    dtype = str(value.dtype).removeprefix("torch.")
    if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        # q_scale() is a Python float (a double): JSON writes it back exactly
        return {"kind": "per_tensor", "dtype": dtype, "scale": value.q_scale(), "zero_point": value.q_zero_point()}
    if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        tensors[f"{key}::scales"] = _narrowest(value.q_per_channel_scales(), (torch.float32,))
        tensors[f"{key}::zero_points"] = _narrowest(value.q_per_channel_zero_points(), (torch.int8, torch.int32))
        return {"kind": "per_channel", "dtype": dtype, "axis": value.q_per_channel_axis()}
    raise KdqError(f"cannot save quantized tensor {key!r} with scheme {value.qscheme()}")


def decompose_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """`model`'s state as plain tensors plus the JSON that reassembles it: (tensors, state, rnn).

    Dynamic int8 LSTM/GRU layers keep their weights in opaque packed objects; those are stored
    as the layers' own weight and bias tensors (`rnn`, by module name) and repacked on load.
    """
    tensors: dict[str, torch.Tensor] = {}
    rnns = {name: m for name, m in model.named_modules() if isinstance(m, _DynamicRNN)}
    owner = {key: name for name, m in rnns.items() for key in m.state_dict(prefix=f"{name}." if name else "")}
    entries: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.ScriptObject) and key in owner:
            entries[key] = {"kind": "rnn_cell", "module": owner[key]}
        else:
            entries[key] = _decompose(key, value, tensors)
    rnn = {
        name: {k: _decompose(f"{name}::rnn::{k}", t, tensors) for k, t in {**m.get_weight(), **m.get_bias()}.items()}
        for name, m in rnns.items()
    }
    return tensors, entries, rnn


def _narrowest(values: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """`values` in the first of `dtypes` that holds them exactly, else unchanged.

    torch keeps per-channel scales as float64 and zero points as int64, but observers compute
    float32 scales and symmetric weights have zero points of 0: 16 bytes a channel shrink to 5,
    which matters for depthwise convs, whose channels hold only 9 int8 weights each.
    """
    for dtype in dtypes:
        narrow = values.to(dtype)
        if torch.equal(narrow.to(values.dtype), values):
            return narrow
    return values


def _assemble(key: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    kind = entry["kind"]
    if kind == "dtype":
        return _dtype(entry["dtype"])
    if kind == "none":
        return None
    if kind == "tuple":
        return tuple(_assemble(f"{key}::{i}", e, tensors) for i, e in enumerate(entry["items"]))
    if kind == "tensor":
        return tensors[key]
    ints = tensors[f"{key}::int"]
    if kind == "per_tensor":
        q = torch._make_per_tensor_quantized_tensor(ints, entry["scale"], entry["zero_point"])
    elif kind == "per_channel":
        q = torch._make_per_channel_quantized_tensor(
            ints, tensors[f"{key}::scales"].double(), tensors[f"{key}::zero_points"].long(), entry["axis"]
        )
    else:
        raise KdqError(f"{MANIFEST}: unknown entry kind {kind!r} for {key!r}")
    if q.dtype != _dtype(entry["dtype"]):
        raise KdqError(f"{MANIFEST}: {key!r} should be {entry['dtype']}, its stored values give {q.dtype}")
    return q


def _dtype(name: str) -> torch.dtype:
    if name not in _QDTYPES:
        raise KdqError(f"{MANIFEST}: unsupported dtype {name!r}; expected one of {', '.join(_QDTYPES)}")
    return _QDTYPES[name]


def save_quantized(path_dir: str | Path, float_model_spec: dict, quantized_model: nn.Module, meta: dict | None = None) -> Path:
    """Write `quantized_model` (made by kdq.quant) to `path_dir` as safetensors + JSON.

    `float_model_spec` is the float model's `kdq_spec` (how `create_model` rebuilds it);
    `meta` is any extra JSON data (accuracy, data set) kept in the manifest.
    """
    recipe = getattr(quantized_model, "kdq_quant", None)
    if recipe is None:
        raise KdqError("save_quantized needs a model made by kdq.quant (quantize_static, quantize_dynamic or convert_qat)")
    if not float_model_spec or not float_model_spec.get("name"):
        raise KdqError("save_quantized needs the float model's kdq_spec (a zoo model built by create_model)")
    tensors, entries, rnn = decompose_state(quantized_model)
    out = Path(path_dir)
    save_weights(out / TENSORS, tensors)
    manifest = {"format": FORMAT, "version": 1, "spec": float_model_spec, "recipe": recipe, "state": entries, "meta": meta or {}}
    if rnn:  # absent for models without dynamic LSTM/GRU layers, so older files read the same
        manifest["rnn"] = rnn
    write_json(out / MANIFEST, manifest)  # written last: its presence marks a complete save
    return out


def load_quantized(path_dir: str | Path) -> nn.Module:
    """Rebuild an int8 model saved by `save_quantized`; nothing is unpickled."""
    path = Path(path_dir)
    if not (path / MANIFEST).exists() or not (path / TENSORS).exists():
        raise KdqError(f"{path} holds no quantized model ({MANIFEST} and {TENSORS} expected)")
    manifest = read_manifest(path / MANIFEST)
    check_registered(manifest["spec"]["name"], str(path))
    tensors = load_weights(path / TENSORS)
    try:
        model = _rebuild(manifest["spec"], manifest["recipe"])
        _repack_rnns(model, manifest.get("rnn", {}), tensors)
        fresh = model.state_dict()  # holds the repacked LSTM/GRU weights
        state = OrderedDict(
            (k, _packed_rnn_state(k, fresh) if e.get("kind") == "rnn_cell" else _assemble(k, e, tensors))
            for k, e in manifest["state"].items()
        )
        # Quantized modules pick their loading code by per-module version metadata; take it from the
        # freshly built model (same code, same versions) rather than storing it in the file.
        state._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
        # the manifest is well-formed but names tensors the file lacks, or of other shapes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise KdqError(f"{path / TENSORS} does not match {path / MANIFEST} ({first}); {DAMAGED}") from None
    model.kdq_quant = manifest["recipe"]
    return model


_ENTRY_KINDS = ("dtype", "none", "tuple", "tensor", "per_tensor", "per_channel", "rnn_cell")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """quantized.json, checked (keys, types, ranges: the dummy input's shape above all) before use."""
    manifest = read_json(path, expect=dict)
    if manifest.get("format") != FORMAT:
        raise KdqError(f"{path}: not a kdq int8 model (format {short_repr(manifest.get('format'))})")
    check = Checker(path)
    check.model_spec(check.key(manifest, "spec"), "spec")
    recipe = check.mapping(check.key(manifest, "recipe"), "recipe")
    kind = check.string(check.key(recipe, "kind", "recipe"), "recipe.kind", ("dynamic", "static", "qat"))
    if kind == "dynamic":
        check.string(check.key(recipe, "dtype", "recipe"), "recipe.dtype", tuple(_QDTYPES))
    else:
        shape = check.shape(check.key(recipe, "input_shape", "recipe"), "recipe.input_shape")
        # the dummy calibration input must fit the model: image channels, or a vector's length
        fits = shape[0] if len(shape) == 3 else math.prod(shape)
        check.expect(fits == manifest["spec"]["in_channels"], shape, "recipe.input_shape",
                     f"the input of a model with in_channels {manifest['spec']['in_channels']}")
        check.string(check.key(recipe, "backend", "recipe"), "recipe.backend")
        check.boolean(check.key(recipe, "per_channel", "recipe"), "recipe.per_channel")
    if kind == "static":
        check.string(check.key(recipe, "observer", "recipe"), "recipe.observer")
        check.strings(check.key(recipe, "skip", "recipe"), "recipe.skip", 0, 10_000)
    for key, entry in check.mapping(check.key(manifest, "state"), "state").items():
        _check_entry(check, entry, f"state[{key!r}]")
    for name, params in check.mapping(check.key(manifest, "rnn", default={}), "rnn").items():
        for key, entry in check.mapping(params, f"rnn[{name!r}]").items():
            _check_entry(check, entry, f"rnn[{name!r}][{key!r}]")
    meta = check.mapping(check.key(manifest, "meta", default={}), "meta")
    check.data_fields(meta, "meta", required=False)
    return manifest


def _check_entry(check: Checker, entry: Any, path: str, depth: int = 0) -> None:
    """One `state` entry of the manifest: the JSON `_assemble` reads."""
    entry = check.mapping(entry, path)
    kind = check.string(check.key(entry, "kind", path), f"{path}.kind", _ENTRY_KINDS)
    if kind in ("dtype", "per_tensor", "per_channel"):
        check.string(check.key(entry, "dtype", path), f"{path}.dtype", tuple(_QDTYPES))
    if kind == "per_tensor":
        check.number(check.key(entry, "scale", path), f"{path}.scale")
        check.integer(check.key(entry, "zero_point", path), f"{path}.zero_point", -(2**31), 2**31 - 1)
    elif kind == "per_channel":
        check.integer(check.key(entry, "axis", path), f"{path}.axis", 0, 7)
    elif kind == "tuple":
        items = check.items(check.key(entry, "items", path), f"{path}.items", 0, 16)
        check.expect(depth < 4, "nested tuples", path, "at most 4 tuples deep")
        for i, item in enumerate(items):
            _check_entry(check, item, f"{path}.items[{i}]", depth + 1)
    elif kind == "rnn_cell":
        check.string(check.key(entry, "module", path), f"{path}.module")


def _repack_rnns(model: nn.Module, rnn: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Load the stored weights of each dynamic int8 LSTM/GRU layer into the rebuilt model."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _DynamicRNN)}
    if sorted(rnn) != sorted(layers):
        raise KdqError(f"{MANIFEST}: its LSTM/GRU layers {sorted(rnn)} do not match the model's {sorted(layers)}; re-quantize the run")
    for name, params in rnn.items():
        layers[name].set_weight_bias({k: _assemble(f"{name}::rnn::{k}", e, tensors) for k, e in params.items()})


def _packed_rnn_state(key: str, fresh: dict[str, Any]) -> Any:
    if key not in fresh:
        raise KdqError(f"{MANIFEST}: {key!r} is no LSTM/GRU weight of the model; re-quantize the run")
    return fresh[key]


def _rebuild(spec: dict, recipe: dict) -> nn.Module:
    """The same quantized module graph, with placeholder values about to be overwritten."""
    from kdq.quant.ptq import quantize_dynamic, quantize_static
    from kdq.quant.qat import convert_qat, prepare_qat

    float_model = create_model(**spec)
    kind = recipe.get("kind")
    if kind == "dynamic":
        return quantize_dynamic(float_model, dtype=_dtype(recipe["dtype"]))
    # Two random rows: observers need finite ranges to convert, and batch norm needs > 1 row.
    dummy = torch.randn(2, *recipe["input_shape"], generator=torch.Generator().manual_seed(0))
    if kind == "static":
        return quantize_static(
            float_model, dummy, backend=recipe["backend"], observer=recipe["observer"],
            per_channel=recipe["per_channel"], skip=recipe["skip"],
        )
    if kind == "qat":
        prepared = prepare_qat(float_model, dummy, backend=recipe["backend"], per_channel=recipe["per_channel"])
        with torch.no_grad():
            prepared(dummy)
        return convert_qat(prepared)
    raise KdqError(f"{MANIFEST}: unknown quantization kind {kind!r}")
