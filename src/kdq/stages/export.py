"""`kdq export` / `kdq.export`: a run's model as ONNX (float or int8) or one packed low-bit file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from kdq.data import DataBundle
from kdq.engine import count_macs, count_params, predict, weight_sparsity
from kdq.errors import KdqError
from kdq.quant.lowbit.pack import export_packed_file
from kdq.rundir.load import LoadedRun, calibration_set, check_calibration, load_run, renormalize, run_format
from kdq.stages.registry import STAGES, StageKind


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
    # ONNX and ONNX Runtime load only for an export, not for every kdq command
    from kdq.deploy import OrtModel, check_agreement, export_onnx, quantize_onnx_static
    from kdq.deploy.onnx_export import MIN_FLOAT_AGREEMENT

    run_dir, out = Path(run), Path(out)
    if format not in ("onnx", "packed"):
        raise KdqError(f"format must be onnx or packed, got {format!r}")
    if int8:
        check_calibration(calibration_batches, batch_size)  # before the float file is written
    kind = run_format(run_dir).kind
    if format == "packed":
        if kind != "lowbit":
            raise KdqError(f"{run_dir} is not a low-bit run; --format packed exports runs made by `kdq qat --bits`")
        export_packed_file(run_dir, out)
        return {"packed": str(out), "size_bytes": out.stat().st_size}
    if kind == "lowbit":
        raise KdqError(f"{run_dir} is a low-bit run; export it with --format packed (ONNX has no low-bit kernels)")
    loaded = load_run(run_dir, data)
    if kind == "int8":
        return _export_int8_run(loaded, out)
    model, meta, bundle = loaded.model, loaded.meta, loaded.data
    test_x = renormalize(bundle.test.x, bundle, meta)
    meta = {**meta, **_source_figures(model, test_x)}
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


def _source_figures(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """MACs and weight sparsity of the model exported, carried in the ONNX file's metadata so
    that `kdq evaluate model.onnx` reports them like any run (an ONNX Runtime int8 file made
    from the float export carries the float model's figures)."""
    return {"macs": count_macs(model, x[:1]), "sparsity": weight_sparsity(model), "params": count_params(model)}


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1).cpu() == y.cpu()).float().mean().item()


def _export_int8_run(loaded: LoadedRun, out: Path) -> dict[str, Any]:
    from kdq.deploy import OrtModel, export_onnx

    qmodel, meta, bundle = loaded.model, loaded.meta, loaded.data
    test_x = renormalize(bundle.test.x, bundle, meta).cpu()  # PyTorch int8 kernels are CPU kernels
    meta = {**meta, **_source_figures(qmodel, test_x)}
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


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (float, or int8 from quantize/qat: exported with its own scales)")
    parser.add_argument("--format", choices=("onnx", "packed"), default="onnx",
                        help="onnx, or packed: a low-bit run's weights at their real bit width in one safetensors file")
    parser.add_argument("--out", required=True, help="file to write, e.g. runs/kd/model.onnx")
    parser.add_argument("--int8", action="store_true",
                        help="int8 QDQ with per-channel weights: calibrated by ONNX Runtime for a float run, "
                             "carried over for an int8 run (which is exported as int8 either way)")
    parser.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8",
                        help="ONNX Runtime calibration only: uint8 activations (U8S8, fastest on AVX2 CPUs) or int8 (S8S8)")
    parser.add_argument("--calibration-batches", type=int, default=32, help="training batches used to calibrate (default 32)")
    parser.add_argument("--calibration-batch-size", type=int, default=128)
    parser.add_argument("--calibrate-method", choices=("minmax", "entropy", "percentile"), default="minmax")


def _cli(args: argparse.Namespace) -> None:
    info = export(args.run, args.out, int8=args.int8, calibration_batches=args.calibration_batches,
                  batch_size=args.calibration_batch_size, calibrate_method=args.calibrate_method,
                  activation_type=args.activation_type, format=args.format)
    print(json.dumps(info, indent=2))


STAGES.register(StageKind("export", export, "export a run directory's model for deployment", writes="float",
                          add_arguments=_arguments, run_cli=_cli, yaml=False))
