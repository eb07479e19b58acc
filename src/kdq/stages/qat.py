"""`kdq qat` / `kdq.qat` / YAML `kind: qat`: quantization-aware fine-tuning, int8 or low-bit.

    kdq.qat("runs/kd", "runs/kd-qat", teacher="runs/teacher", epochs=3)       # int8
    kdq.qat("runs/kd", "runs/kd-w4a4", bits="w4a4", teacher="runs/teacher")   # low-bit (kdq.stages.lowbit)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from torch import nn

from kdq.data import DataBundle
from kdq.distill import method_spec
from kdq.distill.objective import Method
from kdq.engine import TrainConfig, distributed, fit
from kdq.engine.config import FINE_TUNE_DEFAULTS, QAT_DEFAULTS, RUN_CONTROL_KEYS
from kdq.errors import KdqError
from kdq.quant import apply_qat_freeze, convert_qat, prepare_qat, qat_freeze_callback
from kdq.rundir.claim import claim
from kdq.rundir.layout import write_config
from kdq.rundir.load import data_record, load_model, run_data
from kdq.stages.registry import STAGES, StageKind
from kdq.stages.common import primary_results, record_results, zoo_spec
from kdq.stages.distill import check_kd, method_arguments, teacher_record
from kdq.stages.lowbit import LOWBIT_KEYS, fine_tune_config, lowbit_config, lowbit_qat, teacher_objective
from kdq.stages.options import add_run_options, add_train_options, first_last_bits, print_results, train_options
from kdq.stages.quantize import BACKENDS, score_int8

INT8_QAT_KEYS = ("backend", "per_channel", "freeze_bn_epoch", "freeze_observer_epoch")


def qat(
    run: str | Path,
    out: str | Path,
    *,
    bits: str | None = None,
    quantizer: str = "lsq",
    act_quantizer: str | None = None,
    first_last_bits: int | None = 8,
    teacher: str | Path | nn.Module | list[str | Path | nn.Module] | None = None,
    distill_method: Method = "kd",
    temperature: float = 4.0,
    alpha: float = 0.7,
    features: list[str] | None = None,
    backend: str = "x86",
    per_channel: bool = True,
    freeze_bn_epoch: int | None = None,
    freeze_observer_epoch: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    data: str | DataBundle | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Quantization-aware fine-tuning of a run's model (optionally distilled from `teacher`).

    Without `bits`: int8 (backend, per_channel and the freeze epochs apply). With `bits` (a
    scheme such as "w4a4"): low-bit, see kdq.stages.lowbit.lowbit_qat (quantizer,
    act_quantizer and first_last_bits apply). `out` must be new or empty, unless `resume`
    continues the run there or `overwrite` replaces it.
    """
    common = dict(teacher=teacher, distill_method=distill_method, temperature=temperature, alpha=alpha,
                  features=features, resume=resume, overwrite=overwrite, data=data)
    if bits is not None:
        return lowbit_qat(run, out, bits=bits, quantizer=quantizer, act_quantizer=act_quantizer,
                          first_last_bits=first_last_bits, **common, **options)
    return _int8_qat(run, out, backend=backend, per_channel=per_channel, freeze_bn_epoch=freeze_bn_epoch,
                     freeze_observer_epoch=freeze_observer_epoch, **common, **options)


def _int8_qat(run, out, *, teacher, distill_method, temperature, alpha, features, backend, per_channel,  # noqa: ANN001
              freeze_bn_epoch, freeze_observer_epoch, resume, overwrite, data, **options) -> dict[str, Any]:  # noqa: ANN003
    run, out = Path(run), Path(out)
    # fine-tuning: short and gentle; fp32 throughout, because fake quantization's fused observer
    # kernels reject the fp16 activations that CUDA autocast would hand them
    cfg = TrainConfig.from_dict({**QAT_DEFAULTS, **options, "amp": False})
    model, meta = load_model(run)
    spec = zoo_spec(model, run)
    data = run_data(run, data)
    qat_model = prepare_qat(model, data.train.x[:2], backend=backend, per_channel=per_channel)
    objective, methods = teacher_objective(teacher, data, cfg, distill_method, temperature, alpha, features)
    record = {"command": "qat", "source": str(run), "backend": backend, "per_channel": per_channel,
              "freeze_bn_epoch": freeze_bn_epoch, "freeze_observer_epoch": freeze_observer_epoch,
              "teacher": teacher_record(teacher), "temperature": temperature, "alpha": alpha,
              **methods, "train": cfg.to_dict(), "data": data_record(data)}
    callback = qat_freeze_callback(qat_model, freeze_bn_epoch=freeze_bn_epoch, freeze_observer_epoch=freeze_observer_epoch)
    primary = distributed.is_primary()
    with distributed.primary_only(claim(out, "int8", "qat", resume=resume, overwrite=overwrite, record=record), out):
        if primary:
            write_config(out, record)
        start = time.perf_counter()
        result = fit(qat_model, data, cfg, out, objective=objective, resume=resume, on_epoch_start=callback)
        if not primary:  # under torchrun: rank 0 converts, scores and writes; the others take its results
            return primary_results(out)
        # restoring the best epoch's state can switch observers back on; the schedule decides
        apply_qat_freeze(qat_model, cfg.epochs, freeze_bn_epoch=freeze_bn_epoch, freeze_observer_epoch=freeze_observer_epoch)
        qmodel = convert_qat(qat_model.cpu())
        results = score_int8(out, qmodel, model, spec, meta, data)
        results.update(best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy,
                       train_time_s=time.perf_counter() - start)
        record_results(out, results, data, title=f"{spec.get('name')} int8 QAT")
    distributed.barrier()  # the other ranks read results.json now
    return results


def check_qat(options: dict[str, Any], train: dict[str, Any]) -> None:
    """A YAML qat stage is int8 or low-bit: mixed keys and a bad scheme are refused before any work."""
    if "teacher" in options:
        check_kd(options, train, "distill_method")
    lowbit = [k for k in LOWBIT_KEYS if k in options]
    if not lowbit:
        TrainConfig.from_dict({**QAT_DEFAULTS, **train})
        return
    if "bits" not in options:
        raise KdqError(f"{lowbit[0]!r} needs bits, e.g. bits: w4a4")
    if not isinstance(options["bits"], str):
        raise KdqError("bits must be one scheme such as w4a4 in a qat stage (a recipe stage takes a list)")
    mixed = [k for k in INT8_QAT_KEYS if k in options]
    if mixed:
        raise KdqError(f"{mixed[0]!r} is an int8 QAT option and does not apply with bits: {options['bits']}")
    lowbit_config(str(options["bits"]), options.get("quantizer", "lsq"), options.get("act_quantizer"),
                  options.get("first_last_bits", 8))
    fine_tune_config(train)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory of a float model")
    add_run_options(parser)
    parser.add_argument("--teacher", action="append",
                        help="distill from this run directory while fine-tuning (repeat: the teachers' mean logits)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    method_arguments(parser, "--distill-method")
    parser.add_argument("--backend", choices=BACKENDS, default="x86")
    parser.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--freeze-bn-epoch", type=int, help="stop updating batch-norm statistics from this epoch")
    parser.add_argument("--freeze-observer-epoch", type=int, help="freeze quantization ranges from this epoch")
    parser.add_argument("--bits", help="low-bit QAT instead of int8: a scheme such as w4a4, w2a2, w1a32 (a32: float activations)")
    parser.add_argument("--quantizer", default="lsq",
                        help="low-bit quantizer: lsq (default), uniform, dorefa, pact (with DoReFa weights), "
                             "binary or ternary (with LSQ activations)")
    parser.add_argument("--act-quantizer", help="low-bit activation quantizer, when it differs from --quantizer's")
    parser.add_argument("--first-last-bits", type=int, default=8,
                        help="bits of the first and last layers in low-bit QAT (default 8; 32 keeps them float)")
    lowbit_differs = {k: v for k, v in FINE_TUNE_DEFAULTS.items() if QAT_DEFAULTS.get(k) != v}
    add_train_options(parser, {**QAT_DEFAULTS, "amp": False},
                      {"amp": "int8 QAT always trains in fp32; with --bits: True",
                       **{k: f"with --bits: {v}" for k, v in lowbit_differs.items()}})


def _cli(args: argparse.Namespace) -> None:
    teacher = args.teacher[0] if args.teacher and len(args.teacher) == 1 else args.teacher
    common = dict(teacher=teacher, temperature=args.temperature, alpha=args.alpha, resume=args.resume,
                  distill_method=method_spec(args.method, args.method_option) or "kd", features=args.feature,
                  overwrite=args.overwrite, **train_options(args))
    if args.bits:
        results = qat(args.run, args.out, bits=args.bits, quantizer=args.quantizer, act_quantizer=args.act_quantizer,
                      first_last_bits=first_last_bits(args.first_last_bits), **common)
        written = "packed.safetensors, packed.json"
    else:
        results = qat(args.run, args.out, backend=args.backend, per_channel=args.per_channel,
                      freeze_bn_epoch=args.freeze_bn_epoch, freeze_observer_epoch=args.freeze_observer_epoch, **common)
        written = "quantized.safetensors, quantized.json"
    if not distributed.is_primary():  # under torchrun rank 0 reports for all
        return
    print_results(results)
    print(f"wrote {args.out}/ ({written}, results.json)", file=sys.stderr)


STAGES.register(StageKind(
    "qat", qat, "quantization-aware fine-tuning (optionally with a teacher), then int8", check=check_qat,
    writes=lambda options: "lowbit" if "bits" in options else "int8",
    # fine-tuning keeps its own gentle defaults: only the run-control defaults carry over
    inherit=RUN_CONTROL_KEYS,
    add_arguments=_arguments, run_cli=_cli, arch=lambda model, options: f"{model} {options.get('bits', 'int8')}",
    distributed=True,
))
