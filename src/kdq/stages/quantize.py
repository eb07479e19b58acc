"""`kdq quantize` / `kdq.quantize` / YAML `kind: quantize`: int8 post-training quantization.

    kdq.quantize("runs/kd", "runs/kd-int8", method="static", calibration_batches=32)

The run directory holds quantized.safetensors + quantized.json (no pickle), config.yaml and
results.json; `kdq evaluate` and `kdq.evaluate` read it back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torch import nn

from kdq.data import DataBundle
from kdq.engine import count_params, distributed
from kdq.errors import KdqError, short_repr
from kdq.quant import quantize_dynamic, quantize_static, save_quantized
from kdq.rundir.claim import claim
from kdq.rundir.layout import INT8_TENSORS, write_config
from kdq.rundir.load import calibration_set, data_record, load_model, renormalized, run_data
from kdq.stages.registry import STAGES, StageKind
from kdq.stages.common import record_results, zoo_spec
from kdq.stages.evaluate import evaluate
from kdq.stages.options import add_run_options, print_results

METHODS = ("static", "dynamic")
BACKENDS = ("x86", "fbgemm", "qnnpack")
OBSERVERS = ("minmax", "moving_average", "histogram")


def score_int8(out: Path, qmodel: nn.Module, float_model: nn.Module, spec, meta, data) -> dict[str, Any]:  # noqa: ANN001
    """Save the int8 model and score it; the caller adds its own keys and writes results.json once."""
    save_quantized(out, spec, qmodel, meta={**meta, "float_params": count_params(float_model)})
    # in the model's own input units, exactly as `kdq evaluate` will reload and score it
    results = evaluate(renormalized(qmodel, meta, data), data, weights=out / INT8_TENSORS)
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
    # nothing to train: one process calibrates in seconds, and under torchrun every rank would write `out`
    distributed.require_one_process("int8 post-training quantization")
    run, out = Path(run), Path(out)
    model, meta = load_model(run)
    spec = zoo_spec(model, run)
    data = run_data(run, data)
    if method == "static":
        calib = calibration_set(data, meta, calibration_batches, batch_size)
        qmodel = quantize_static(model, calib, backend=backend, observer=observer, per_channel=per_channel, skip=skip)
    else:
        qmodel = quantize_dynamic(model)
    record = {"command": "quantize", "source": str(run), "method": method, "backend": backend, "observer": observer,
              "per_channel": per_channel, "skip": list(skip), "calibration_batches": calibration_batches,
              "batch_size": batch_size, "data": data_record(data)}
    with claim(out, "int8", "quantize", overwrite=overwrite):
        write_config(out, record)
        results = score_int8(out, qmodel, model, spec, meta, data)
        record_results(out, results, data)
    return results


def _check(options: dict[str, Any], train: dict[str, Any]) -> None:
    """A YAML quantize stage's method, before any work (other keys have shared rules)."""
    method = options.get("method", "static")
    if method not in METHODS:
        raise KdqError(f"method must be one of {', '.join(METHODS)}, got {short_repr(method)}")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory of a float model")
    add_run_options(parser, resume=False)
    parser.add_argument("--method", choices=METHODS, default="static",
                        help="static: int8 weights and activations, calibrated; "
                             "dynamic: int8 Linear, LSTM and GRU weights, activations quantized on the fly")
    parser.add_argument("--calibration-batches", type=int, default=32, help="training batches to calibrate on (default 32)")
    parser.add_argument("--calibration-batch-size", type=int, default=128)
    parser.add_argument("--observer", choices=OBSERVERS, default="histogram")
    parser.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True, help="per-channel weight scales")
    parser.add_argument("--skip", action="append", default=[], metavar="LAYER", help="leave this module in float")
    parser.add_argument("--backend", choices=BACKENDS, default="x86", help="int8 kernels: x86 (default) or qnnpack (ARM)")


def _cli(args: argparse.Namespace) -> None:
    results = quantize(args.run, args.out, method=args.method, calibration_batches=args.calibration_batches,
                       batch_size=args.calibration_batch_size, backend=args.backend, observer=args.observer,
                       per_channel=args.per_channel, skip=args.skip, overwrite=args.overwrite)
    print_results(results)
    print(f"wrote {args.out}/ (quantized.safetensors, quantized.json, results.json)", file=sys.stderr)


STAGES.register(StageKind("quantize", quantize, "int8 post-training quantization of a run directory", writes="int8",
                          add_arguments=_arguments, run_cli=_cli, check=_check,
                          arch=lambda model, options: f"{model} int8"))
