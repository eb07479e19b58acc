"""Save and reload int8 PyTorch models without pickle: safetensors + JSON only.

Quantized tensors are stored decomposed (int8 values, scales, zero points, axis) and the
module graph is not stored at all: loading rebuilds the float zoo model from its spec, re-runs
the same quantization recipe on a dummy input, and loads the stored tensors into it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdq.errors import KdqError
from kdq.io import load_weights, read_json, save_weights, write_json
from kdq.models import create_model

TENSORS = "quantized.safetensors"
MANIFEST = "quantized.json"
FORMAT = "kdq-int8"
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
    tensors: dict[str, torch.Tensor] = {}
    entries = {k: _decompose(k, v, tensors) for k, v in quantized_model.state_dict().items()}
    out = Path(path_dir)
    save_weights(out / TENSORS, tensors)
    manifest = {"format": FORMAT, "version": 1, "spec": float_model_spec, "recipe": recipe, "state": entries, "meta": meta or {}}
    write_json(out / MANIFEST, manifest)  # written last: its presence marks a complete save
    return out


def load_quantized(path_dir: str | Path) -> nn.Module:
    """Rebuild an int8 model saved by `save_quantized`; nothing is unpickled."""
    path = Path(path_dir)
    if not (path / MANIFEST).exists() or not (path / TENSORS).exists():
        raise KdqError(f"{path} holds no quantized model ({MANIFEST} and {TENSORS} expected)")
    manifest = read_json(path / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise KdqError(f"{path / MANIFEST}: not a kdq int8 model (format {manifest.get('format')!r})")
    tensors = load_weights(path / TENSORS)
    model = _rebuild(manifest["spec"], manifest["recipe"])
    state = OrderedDict((k, _assemble(k, e, tensors)) for k, e in manifest["state"].items())
    # Quantized modules pick their loading code by per-module version metadata; take it from the
    # freshly built model (same code, same versions) rather than storing it in the file.
    state._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)
    model.kdq_quant = manifest["recipe"]
    return model


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
