"""Write kdq models as ONNX files that carry their own classes and normalisation."""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from kdq.errors import KdqError
from kdq.io import atomic_write

META_KEY = "kdq"
# What a later `kdq evaluate model.onnx` needs to rebuild the data pipeline and name the classes.
META_FIELDS = ("classes", "mean", "std", "input_shape", "dataset", "architecture")
PRECISIONS = ("float32", "int8")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Float ONNX vs PyTorch differ only by kernel rounding, so argmax must agree almost everywhere.
MIN_FLOAT_AGREEMENT = 0.999


def kdq_metadata(meta: dict[str, Any], precision: str) -> dict[str, Any]:
    """The JSON stored under `metadata_props["kdq"]`: the model.json fields plus precision."""
    if precision not in PRECISIONS:
        raise KdqError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    missing = [k for k in ("classes", "mean", "std", "input_shape") if meta.get(k) is None]
    if missing:
        raise KdqError(f"ONNX export needs model metadata {', '.join(missing)}; pass the run's model.json as meta")
    out = {k: meta.get(k) for k in META_FIELDS}
    out["input_shape"] = list(out["input_shape"])
    out.update(precision=precision, producer="kdq")
    return out


def set_metadata(proto: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Replace any earlier kdq entry so a re-quantized file never carries two."""
    kept = [p for p in proto.metadata_props if p.key != META_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))


def get_metadata(proto: onnx.ModelProto) -> dict[str, Any] | None:
    """The kdq entry of an ONNX model, or None when it has none (or an unreadable one)."""
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            try:
                value = json.loads(prop.value)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _save(proto: onnx.ModelProto, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))


def _torchscript_export(model: nn.Module, example: torch.Tensor, f: io.BytesIO, opset: int) -> None:
    # The TorchScript exporter works in torch 2.13 and needs no onnxscript (not installed);
    # its deprecation warning is not something a kdq user can act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example,), f, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    meta: dict[str, Any],
    opset: int = 17,
    verify: bool = True,
) -> Path:
    """Export a float model to ONNX with a dynamic batch axis (`input` -> `logits`).

    `example` is a normalised input batch; with `verify`, ONNX Runtime is run on it and the
    export is refused unless >= 99.9% of its argmax predictions match PyTorch's.
    """
    info = kdq_metadata(meta, "float32")
    was_training = model.training
    model.eval()  # dropout and batch-norm must be frozen into the graph as at inference
    buf = io.BytesIO()
    try:
        _torchscript_export(model, example, buf, opset)
    except Exception as exc:  # noqa: BLE001 - exporter errors are many and deep; report the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdqError(f"ONNX export of {type(model).__name__} failed: {first}") from None
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    set_metadata(proto, info)
    path = _save(proto, path)
    if verify:
        _verify(model, path, example)
    return path


def _verify(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    from kdq.deploy.ort import OrtModel, check_agreement

    result = check_agreement(model, OrtModel(path), example)
    if result["agreement"] < MIN_FLOAT_AGREEMENT:
        path.unlink(missing_ok=True)  # a file that disagrees with its source must not be left to use
        raise KdqError(
            f"ONNX export disagrees with PyTorch on {1 - result['agreement']:.2%} of predictions "
            f"(max logit difference {result['max_abs_diff']:.3g}); the model has an op ONNX does not reproduce"
        )


class _TensorReader:
    """Feeds a calibration tensor to ORT's calibrator in fixed-size batches.

    Duck-types `onnxruntime.quantization.CalibrationDataReader` (get_next/rewind).
    """

    def __init__(self, x: torch.Tensor, input_name: str, batch_size: int) -> None:
        self.x, self.input_name, self.batch_size, self.pos = x, input_name, batch_size, 0

    def get_next(self) -> dict[str, Any] | None:
        if self.pos >= len(self.x):
            return None
        batch = self.x[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return {self.input_name: batch.detach().cpu().float().contiguous().numpy()}

    def rewind(self) -> None:
        self.pos = 0


def quantize_onnx_static(
    float_onnx_path: str | Path,
    calibration: torch.Tensor,
    out_path: str | Path,
    *,
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    batch_size: int = 32,
) -> Path:
    """Static int8 quantization by ONNX Runtime, QDQ format, calibrated on `calibration` (N, ...).

    Weights and activations are signed int8 (S8S8): ORT's documentation names S8S8 in QDQ the
    default and first choice on CPU; U8U8 is its fallback when accuracy drops a lot.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise KdqError(f"calibrate_method must be one of {', '.join(methods)}, got {calibrate_method!r}")
    if len(calibration) == 0:
        raise KdqError("static quantization needs calibration samples; got an empty tensor")
    from kdq.deploy.ort import load_onnx  # same checks and messages as loading for inference

    proto, meta = load_onnx(float_onnx_path)
    if meta.get("precision") != "float32":
        raise KdqError(f"{float_onnx_path} is already {meta.get('precision')}; quantize the float export")
    input_name = proto.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="kdq-ort-quant-") as tmp:
        pre, quant = Path(tmp) / "pre.onnx", Path(tmp) / "quant.onnx"
        # Shape inference + graph optimisation first, as ORT recommends: it folds BN into conv
        # so there is one quantized weight per conv instead of separate BN arithmetic.
        quant_pre_process(proto, str(pre))
        quantize_static(
            str(pre), str(quant), _TensorReader(calibration, input_name, batch_size),
            quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[calibrate_method],
        )
        out = onnx.load(str(quant))
    set_metadata(out, {**meta, "precision": "int8"})
    return _save(out, out_path)
