"""`kdq distill` / `kdq.distill` / YAML `kind: distill`: a student taught by a teacher."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import nn

from kdq.data import DataBundle
from kdq.distill import TEACHER_MODES, Distiller, KDLoss
from kdq.engine import TrainConfig, seed_everything
from kdq.errors import KdqError
from kdq.rundir.load import load_teacher, resolve_data
from kdq.stages.registry import STAGES, StageKind
from kdq.stages.common import Run, build_model, model_spec, train_and_report
from kdq.stages.options import add_data_options, add_train_options
from kdq.stages.train import common_options, model_arguments, report


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
        "model": model_spec(net),
        "train": cfg.to_dict(),
        "distill": {
            "teacher": str(teacher) if not isinstance(teacher, nn.Module) else type(teacher).__name__,
            "temperature": temperature,
            "alpha": alpha,
            "teacher_mode": teacher_mode,
        },
    }
    return train_and_report(net, bundle, cfg, out, record, objective=objective, resume=resume, overwrite=overwrite)


def check_kd(options: dict[str, Any], train: dict[str, Any]) -> None:
    """A YAML stage's distillation options, checked before any work."""
    KDLoss(options.get("temperature", 4.0), options.get("alpha", 0.7))
    if options.get("teacher_mode", "online") not in TEACHER_MODES:
        raise KdqError(f"teacher_mode must be one of {', '.join(TEACHER_MODES)}")


def _arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    parser.add_argument("--teacher", required=True, help="the teacher's run directory")
    parser.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T (default 4)")
    parser.add_argument("--alpha", type=float, default=0.7, help="weight of the soft term (default 0.7)")
    parser.add_argument("--teacher-mode", choices=TEACHER_MODES, default="online",
                        help="run the teacher on every batch, or once over the training set")
    add_data_options(parser)
    add_train_options(parser)


def _cli(args: argparse.Namespace) -> None:
    run = distill(args.model, args.teacher, args.data, temperature=args.temperature, alpha=args.alpha,
                  teacher_mode=args.teacher_mode, **common_options(args))
    report(run, args.out)


STAGES.register(StageKind("distill", distill, "distill a teacher into a student", writes="float",
                          add_arguments=_arguments, run_cli=_cli, check=check_kd, distributed=True))
