"""Write kdq models as ONNX files that carry their own classes and normalisation."""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

# ort never imports this module, so verifying an export with ONNX Runtime makes no cycle.
from kdq.deploy.metadata import get_metadata, kdq_metadata, load_onnx, save_onnx, set_metadata
from kdq.deploy.ort import OrtModel, check_agreement
from kdq.errors import KdqError

__all__ = [  # get_metadata and set_metadata live in kdq.deploy.metadata and stay importable from here
    "MIN_FLOAT_AGREEMENT", "clip_in_integers", "export_onnx", "get_metadata", "kdq_metadata",
    "quantize_onnx_static", "set_metadata",
]

INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Float ONNX vs PyTorch differ only by kernel rounding, so argmax must agree almost everywhere.
MIN_FLOAT_AGREEMENT = 0.999


def _torchscript_export(model: nn.Module, example: torch.Tensor, f: io.BytesIO, opset: int) -> None:
    # The TorchScript exporter works in torch 2.13 and needs no onnxscript (not installed);
    # its deprecation warning is not something a kdq user can act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # int8 ops read their scales as Python floats: constants in the graph, as they should be
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
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
    """Export a float or kdq int8 model to ONNX with a dynamic batch axis (`input` -> `logits`).

    `example` is a normalised input batch. A float model's export, with `verify`, is run by ONNX
    Runtime on it and refused unless >= 99.9% of its argmax predictions match PyTorch's. An int8
    model (made by kdq.quant) is written as QDQ with its own scales and zero points, so a QAT or
    PTQ model keeps exactly the quantization it was trained or calibrated with; int8 kernels
    round differently in each runtime, so its agreement is for the caller to report.
    """
    int8 = getattr(model, "kdq_quant", None) is not None
    info = kdq_metadata(meta, "int8" if int8 else "float32")
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
    if int8:
        clip_in_integers(proto)
    set_metadata(proto, info)
    path = save_onnx(proto, path)
    if verify and not int8:
        _verify(model, path, example)
    return path


def _verify(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    result = check_agreement(model, OrtModel(path), example)
    if result["agreement"] < MIN_FLOAT_AGREEMENT:
        path.unlink(missing_ok=True)  # a file that disagrees with its source must not be left to use
        raise KdqError(
            f"ONNX export disagrees with PyTorch on {1 - result['agreement']:.2%} of predictions "
            f"(max logit difference {result['max_abs_diff']:.3g}); the model has an op ONNX does not reproduce"
        )


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def clip_in_integers(proto: onnx.ModelProto) -> int:
    """Rewrite DequantizeLinear -> Clip -> QuantizeLinear (same scale and zero point) as one integer Clip.

    PyTorch quantizes a ReLU6 it could not fuse into its conv as a separate op; exported, that is
    a float detour ONNX Runtime cannot fuse, and it made MobileNetV2 int8 slower than float. On
    the quantization grid the two are identical: clamp(dq(q), lo, hi) re-quantized equals
    clamp(q, round(lo / s) + z, round(hi / s) + z). Returns how many were rewritten.
    """
    consts = _constants(proto)
    producer = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in proto.graph.output}
    drop, rewritten = set(), 0
    for clip in proto.graph.node:
        if clip.op_type != "Clip" or len(clip.input) != 3 or not all(n in consts for n in clip.input[1:]):
            continue
        dq, users = producer.get(clip.input[0]), consumers.get(clip.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        q = users[0]
        if len(consumers.get(dq.output[0], [])) != 1 or dq.output[0] in graph_outputs:
            continue
        if len(dq.input) != 3 or len(q.input) != 3 or not all(n in consts for n in (*dq.input[1:], *q.input[1:])):
            continue
        scale, zero = consts[dq.input[1]], consts[dq.input[2]]
        if scale.size != 1 or not (np.array_equal(scale, consts[q.input[1]]) and np.array_equal(zero, consts[q.input[2]])):
            continue
        info = np.iinfo(zero.dtype)
        bounds = [np.clip(np.round(consts[n].astype(np.float64) / float(scale)) + int(zero), info.min, info.max)
                  for n in clip.input[1:]]
        names = [f"{clip.name or clip.output[0]}_int_{side}" for side in ("min", "max")]
        for name, value in zip(names, bounds):
            proto.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=zero.dtype), name))
        int_clip = onnx.helper.make_node("Clip", [dq.input[0], *names], [q.output[0]], name=f"{clip.name}_int")
        proto.graph.node.insert(list(proto.graph.node).index(q), int_clip)
        drop.update(id(n) for n in (dq, clip, q))
        rewritten += 1
    kept = [n for n in proto.graph.node if id(n) not in drop]
    used = {name for n in kept for name in n.input} | graph_outputs
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]  # the old bounds
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return rewritten


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
    activation_type: str = "uint8",
    batch_size: int = 32,
) -> Path:
    """Static int8 quantization by ONNX Runtime, QDQ format, calibrated on `calibration` (N, ...).

    Weights are signed int8, per channel by default. Activations are unsigned (U8S8) by default:
    on an AVX2 CPU without VNNI, ONNX Runtime's U8S8 kernels ran MobileNetV2 1.8x faster than
    S8S8, which was slower than float there. `activation_type="int8"` gives S8S8, the form ORT
    suggests for CPUs with VNNI and for accelerators.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise KdqError(f"calibrate_method must be one of {', '.join(methods)}, got {calibrate_method!r}")
    if len(calibration) == 0:
        raise KdqError("static quantization needs calibration samples; got an empty tensor")
    activation_types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if activation_type not in activation_types:
        raise KdqError(f"activation_type must be one of {', '.join(activation_types)}, got {activation_type!r}")
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
            activation_type=activation_types[activation_type], weight_type=QuantType.QInt8,
            calibrate_method=methods[calibrate_method],
        )
        out = onnx.load(str(quant))
    set_metadata(out, {**meta, "precision": "int8"})
    return save_onnx(out, out_path)
