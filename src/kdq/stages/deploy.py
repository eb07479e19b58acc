"""`kdq deploy` / `kdq.deploy` / YAML `kind: deploy`: a run exported to ONNX and scored in ONNX Runtime.

    kdq.deploy("runs/kd-qat", "runs/kd-onnx")    # runs/kd-onnx/deployed.onnx + results.json

The last step of a pipeline in one YAML file: the run directory it writes holds the ONNX file
and ONNX Runtime's figures (accuracy, size of the file, latency, throughput), so the
experiment's table compares the deployed model with the PyTorch runs beside it. A float run
is exported as float, or as int8 calibrated by ONNX Runtime (`int8`); an int8 run (quantize,
qat) as int8 with its own scales (kdq.stages.export).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kdq.data import DataBundle
from kdq.rundir.claim import claim
from kdq.rundir.layout import DEPLOYED, write_config
from kdq.rundir.load import check_calibration, data_record, run_data
from kdq.stages.common import record_results
from kdq.stages.evaluate import evaluate_onnx_file
from kdq.stages.export import export
from kdq.stages.options import add_run_options, print_results
from kdq.stages.registry import STAGES, StageKind


def deploy(
    run: str | Path,
    out: str | Path,
    *,
    int8: bool = False,
    calibration_batches: int = 32,
    calibrate_method: str = "minmax",
    activation_type: str = "uint8",
    resume: bool = False,
    overwrite: bool = False,
    data: str | DataBundle | None = None,
) -> dict[str, Any]:
    """Export `run` to out/deployed.onnx, score it with ONNX Runtime and write out/results.json."""
    run, out = Path(run), Path(out)
    if int8:
        check_calibration(calibration_batches, 128)
    bundle = run_data(run, data)  # a folder that holds no run fails here, before `out` is claimed
    record = {"command": "deploy", "source": str(run), "int8": int8, "calibration_batches": calibration_batches,
              "calibrate_method": calibrate_method, "activation_type": activation_type, "data": data_record(bundle)}
    with claim(out, "onnx", "deploy", resume=resume, overwrite=overwrite, record=record):
        write_config(out, record)
        info = export(run, out / DEPLOYED, int8=int8, calibration_batches=calibration_batches,
                      calibrate_method=calibrate_method, activation_type=activation_type, data=bundle)
        results = evaluate_onnx_file(out / DEPLOYED, bundle, write=False)
        results["export"] = {k: v for k, v in info.items() if not k.endswith("_onnx")}  # paths: the run's own files
        record_results(out, results, bundle)
    return results


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (float, or int8 from quantize/qat: exported with its own scales)")
    add_run_options(parser, resume=False)
    parser.add_argument("--int8", action="store_true",
                        help="a float run as int8, calibrated by ONNX Runtime (an int8 run is int8 either way)")
    parser.add_argument("--calibration-batches", type=int, default=32)
    parser.add_argument("--calibrate-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    parser.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8")


def _cli(args: argparse.Namespace) -> None:
    results = deploy(args.run, args.out, int8=args.int8, calibration_batches=args.calibration_batches,
                     calibrate_method=args.calibrate_method, activation_type=args.activation_type,
                     overwrite=args.overwrite)
    print_results(results)
    print(f"wrote {args.out}/ ({DEPLOYED}, results.json)", file=sys.stderr)


STAGES.register(StageKind("deploy", deploy, "export a run to ONNX and score it in ONNX Runtime, as a run directory",
                          writes="onnx", takes=("float", "int8"), add_arguments=_arguments, run_cli=_cli,
                          arch=lambda model, options: f"{model} onnx{' int8' if options.get('int8') else ''}"))
