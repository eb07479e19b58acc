"""`kdq distill` / `kdq.distill` / YAML `kind: distill`: a student taught by a teacher."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import nn

from kdq.data import DataBundle
from kdq.distill import TEACHER_MODES, Distiller, method_losses, method_record, method_spec, parse_features
from kdq.distill.objective import Method, hint_names, labeled_mask
from kdq.distill.teacher import Ensemble, ensemble_weights
from kdq.engine import TrainConfig, seed_everything
from kdq.errors import KdqError
from kdq.rundir.load import load_teachers, resolve_data
from kdq.stages.registry import STAGES, StageKind
from kdq.stages.common import Run, build_model, model_spec, train_and_report
from kdq.stages.options import add_data_options, add_train_options
from kdq.stages.train import common_options, model_arguments, report


def distill(
    student: str | nn.Module,
    teacher: str | Path | nn.Module | list[str | Path | nn.Module],
    data: str | DataBundle = "fashion-mnist",
    *,
    teacher_weights: list[float] | None = None,
    labeled: int | None = None,
    method: Method = "kd",
    temperature: float = 4.0,
    alpha: float = 0.7,
    teacher_mode: str = "online",
    features: list[str] | None = None,
    hint_epochs: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    data_options: dict[str, Any] | None = None,
    **options: Any,
) -> Run:
    """Distil `teacher` into `student` with `method`: a name from kdq.distill.LOSSES (`kdq methods`),
    or a weighted mapping of them ({"kd": 1.0, "at": 1000}). `temperature` and `alpha` go to
    the methods that take them; `features` pairs layers as "student_layer=teacher_layer" for
    the feature methods (default: both models' feature_layers()).

    Several teachers (a list of run directories or modules) teach as one: the weighted mean of
    their logits (`teacher_weights`, equal by default), for logit methods. `labeled=N` keeps
    the labels of N training images (kdq.distill.objective.labeled_mask, seeded by the run's
    seed) and scores the rest by the distillation terms only. `hint_epochs=N` is FitNets'
    two-stage schedule: the feature methods alone for N epochs, then the others with CE."""
    losses = method_losses(method, temperature=temperature, alpha=alpha, label_smoothing=options.get("label_smoothing", 0.0))
    pairs = parse_features(features)
    cfg = TrainConfig.from_dict(options)
    check_mixing(losses, teacher_mode, labeled, cfg.mixup, cfg.cutmix)
    check_hints(losses, hint_epochs, cfg.epochs)
    teachers = teacher if isinstance(teacher, (list, tuple)) else [teacher]
    ensemble_weights(teacher_weights, len(teachers))
    bundle, data_record = resolve_data(data, **(data_options or {}))
    mask = None if labeled is None else labeled_mask(bundle.train.y, labeled, bundle.num_classes, cfg.seed)
    teacher_net = load_teachers(teachers, bundle, teacher_weights)
    seed_everything(cfg.seed, cfg.deterministic)  # the initial weights follow --seed
    net = build_model(student, bundle, **(model_kwargs or {}))
    objective = Distiller(teacher_net, losses, teacher_mode, cfg.eval_batch_size, features=pairs,
                          label_smoothing=cfg.label_smoothing, labeled=mask, hint_epochs=hint_epochs)
    record = {
        "command": "distill",
        "data": data_record,
        "model": model_spec(net),
        "train": cfg.to_dict(),
        "distill": {
            "teacher": teacher_record(teacher),
            **({"teacher_weights": [float(w) for w in teacher_weights]} if teacher_weights is not None else {}),
            "temperature": temperature,
            "alpha": alpha,
            "teacher_mode": teacher_mode,
            **method_record("method", method, losses, pairs),
            **({"hint_epochs": hint_epochs} if hint_epochs else {}),  # only when given: older runs resume
        },
        **({"labeled": labeled} if labeled is not None else {}),  # recorded only when given: older runs resume
    }
    return train_and_report(net, bundle, cfg, out, record, objective=objective, resume=resume, overwrite=overwrite)


def check_mixing(losses: dict[str, Any], teacher_mode: str, labeled: int | None, mixup: float, cutmix: float) -> None:
    """Mixup and cutmix give probability targets and mixed images: refused with a method that
    needs class labels, with a cached teacher, and with hidden labels."""
    if not (mixup > 0 or cutmix > 0):
        return
    hard = [name for name, (loss, _) in losses.items() if loss.needs_class_indices]
    if hard:
        raise KdqError(f"{hard[0]} needs class labels, not the mixed targets of mixup/cutmix; turn those off or use kd")
    if teacher_mode == "cached":
        raise KdqError("a cached teacher cannot score mixed images; use teacher_mode='online' with mixup/cutmix")
    if labeled is not None:
        raise KdqError("labeled cannot hide the labels mixup/cutmix mix into every image; turn those off")


def check_hints(losses: dict[str, Any], hint_epochs: Any, epochs: int) -> None:
    """FitNets' schedule needs a feature method, another method, and epochs left after the hints."""
    hint_names({name: loss for name, (loss, _) in losses.items()}, hint_epochs)
    if hint_epochs and hint_epochs >= epochs:
        raise KdqError(f"hint_epochs ({hint_epochs}) must be below epochs ({epochs}), "
                       "so the second stage has epochs to train")


def teacher_record(teacher: Any) -> str | list[str] | None:
    """How config.yaml records a teacher: its path (a module: its class), or a list of them."""
    if teacher is None:
        return None
    if isinstance(teacher, (list, tuple)):
        return [str(teacher_record(t)) for t in teacher]
    return type(teacher).__name__ if isinstance(teacher, nn.Module) else str(teacher)


def check_kd(options: dict[str, Any], train: dict[str, Any], method_key: str = "method") -> None:
    """A YAML stage's distillation options, checked before any work."""
    losses = method_losses(options.get(method_key, "kd"), temperature=options.get("temperature", 4.0),
                           alpha=options.get("alpha", 0.7))
    parse_features(options.get("features"))
    mode = options.get("teacher_mode", "online")
    if mode not in TEACHER_MODES:
        raise KdqError(f"teacher_mode must be one of {', '.join(TEACHER_MODES)}")
    teachers = options.get("teacher")
    count = len(teachers) if isinstance(teachers, list) else 1
    ensemble_weights(options.get("teacher_weights"), count)
    check_mixing(losses, mode, options.get("labeled"), train.get("mixup", 0), train.get("cutmix", 0))
    check_hints(losses, options.get("hint_epochs", 0), train.get("epochs", TrainConfig().epochs))
    # a feature method with the cached teacher, or with several teachers, is refused here
    Distiller(Ensemble([nn.Identity()] * count) if count > 1 else nn.Identity(), losses, mode)


def method_arguments(parser: argparse.ArgumentParser, flag: str) -> None:
    """--method (or --distill-method where --method means something else), its options, --feature."""
    parser.add_argument(flag, dest="method", action="append", metavar="NAME[=WEIGHT]",
                        help="distillation method (see `kdq methods`; default kd); repeat to combine, "
                             "e.g. --method kd --method at=1000")
    parser.add_argument("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                        help="an option of one method, e.g. dkd.beta=8")
    parser.add_argument("--feature", action="append", metavar="STUDENT_LAYER=TEACHER_LAYER",
                        help="feature methods: a layer pair to match (repeatable; default: feature_layers())")


def teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """--teacher (repeatable: several teach as one, the mean of their logits) and --teacher-weights."""
    parser.add_argument("--teacher", action="append", required=True, metavar="DIR",
                        help="the teacher's run directory (float, int8 or low-bit); repeat for an ensemble "
                             "whose logits are the teachers' mean")
    parser.add_argument("--teacher-weights", metavar="W1,W2,...",
                        help="weights of the repeated --teacher's logits, e.g. 0.7,0.3 (default: equal)")


def parse_weights(text: str | None) -> list[float] | None:
    """--teacher-weights 0.7,0.3 as numbers (their checks: kdq.distill.teacher.ensemble_weights)."""
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise KdqError(f"--teacher-weights {text!r} must be numbers separated by commas, e.g. 0.7,0.3") from None


def _arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    teacher_arguments(parser)
    parser.add_argument("--labeled", type=int, metavar="N",
                        help="keep the labels of N training images (seeded by --seed, balanced over classes); "
                             "the rest are taught by the teacher alone")
    parser.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T (default 4)")
    parser.add_argument("--alpha", type=float, default=0.7, help="weight of the soft term (default 0.7)")
    parser.add_argument("--teacher-mode", choices=TEACHER_MODES, default="online",
                        help="run the teacher on every batch, or once over the training set (logit methods only)")
    method_arguments(parser, "--method")
    parser.add_argument("--hint-epochs", type=int, default=0, metavar="N",
                        help="FitNets' two stages: the feature methods alone for N epochs, then the others "
                             "with CE (e.g. --method fitnet --method kd --hint-epochs 2)")
    add_data_options(parser)
    add_train_options(parser)


def _cli(args: argparse.Namespace) -> None:
    teacher = args.teacher[0] if len(args.teacher) == 1 else args.teacher
    run = distill(args.model, teacher, args.data, teacher_weights=parse_weights(args.teacher_weights),
                  labeled=args.labeled, method=method_spec(args.method, args.method_option) or "kd",
                  temperature=args.temperature, alpha=args.alpha, teacher_mode=args.teacher_mode,
                  features=args.feature, hint_epochs=args.hint_epochs, **common_options(args))
    report(run, args.out)


STAGES.register(StageKind("distill", distill, "distill a teacher into a student", writes="float",
                          add_arguments=_arguments, run_cli=_cli, check=check_kd, distributed=True))
