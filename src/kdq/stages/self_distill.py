"""`kdq self-distill` / `kdq.stages.self_distill.self_distill` / YAML `kind: self-distill`: a model
that teaches itself ("Be Your Own Teacher", Zhang et al. 2019; see kdq.distill.self)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import nn

from kdq.data import DataBundle
from kdq.distill.self import SelfDistiller, check_self_options, head_layers
from kdq.engine import TrainConfig, seed_everything
from kdq.rundir.load import resolve_data
from kdq.stages.common import Run, build_model, model_spec, train_and_report
from kdq.stages.options import add_data_options, add_train_options
from kdq.stages.registry import STAGES, StageKind
from kdq.stages.train import common_options, model_arguments, report


def self_distill(
    model: str | nn.Module,
    data: str | DataBundle = "fashion-mnist",
    *,
    temperature: float = 3.0,
    alpha: float = 0.3,
    feature_weight: float = 0.03,
    layers: list[str] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    data_options: dict[str, Any] | None = None,
    **options: Any,
) -> Run:
    """Train `model` with auxiliary heads on `layers` (default: every feature_layers() stage but
    the deepest) taught by its deepest classifier; the heads are dropped from the saved model,
    which is a normal float run. `alpha` weighs each head's soft term against its labels,
    `feature_weight` its hint term; options are TrainConfig fields (epochs, lr, ...)."""
    cfg = TrainConfig.from_dict(options)
    objective = SelfDistiller(temperature, alpha, feature_weight, layers, label_smoothing=cfg.label_smoothing)
    bundle, data_record = resolve_data(data, **(data_options or {}))
    seed_everything(cfg.seed, cfg.deterministic)  # the initial weights follow --seed
    net = build_model(model, bundle, **(model_kwargs or {}))
    chosen = head_layers(net, layers)  # an unknown layer fails here, before the run directory is claimed
    record = {
        "command": "self-distill",
        "data": data_record,
        "model": model_spec(net),
        "train": cfg.to_dict(),
        "self_distill": {"temperature": temperature, "alpha": alpha, "feature_weight": feature_weight, "layers": chosen},
    }
    try:
        return train_and_report(net, bundle, cfg, out, record, objective=objective, resume=resume, overwrite=overwrite)
    finally:
        objective.release()  # the returned model carries no hooks


def _check(options: dict[str, Any], train: dict[str, Any]) -> None:
    check_self_options(options.get("temperature", 3.0), options.get("alpha", 0.3), options.get("feature_weight", 0.03),
                       options.get("layers"))


def _arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    parser.add_argument("--temperature", type=float, default=3.0, help="softmax temperature T of the soft term (default 3)")
    parser.add_argument("--alpha", type=float, default=0.3, help="weight of each head's soft term against its labels (default 0.3)")
    parser.add_argument("--feature-weight", type=float, default=0.03, help="weight of each head's hint term (default 0.03)")
    parser.add_argument("--layer", action="append", metavar="MODULE",
                        help="a layer to put a head on (repeatable; default: feature_layers() but the deepest)")
    add_data_options(parser)
    add_train_options(parser)


def _cli(args: argparse.Namespace) -> None:
    run = self_distill(args.model, args.data, temperature=args.temperature, alpha=args.alpha,
                       feature_weight=args.feature_weight, layers=args.layer, **common_options(args))
    report(run, args.out)


STAGES.register(StageKind("self-distill", self_distill, "a model taught by its own deepest classifier (Be Your Own Teacher)",
                          writes="float", add_arguments=_arguments, run_cli=_cli, check=_check))
