"""`kdq train` / `kdq.train` / YAML `kind: train`: a model trained with cross-entropy."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from torch import nn

from kdq.data import DataBundle, Split
from kdq.distill.objective import labeled_mask
from kdq.engine import TrainConfig, distributed, seed_everything
from kdq.rundir.load import resolve_data
from kdq.stages.registry import STAGES, StageKind
from kdq.stages.common import Run, build_model, model_spec, train_and_report
from kdq.stages.options import (
    add_data_options,
    add_run_options,
    add_train_options,
    data_options,
    parse_model_args,
    print_results,
    train_options,
)


def train(
    model: str | nn.Module,
    data: str | DataBundle = "fashion-mnist",
    *,
    labeled: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    data_options: dict[str, Any] | None = None,
    **options: Any,
) -> Run:
    """Train a model with cross-entropy; options are TrainConfig fields (epochs, lr, ...).

    `out` must be new or empty, unless `resume` continues the run there (with the same model,
    optimizer and data) or `overwrite` replaces it; see kdq.rundir.claim. `labeled=N` trains
    on the N training images `kdq distill --labeled N` keeps labels for (same seed), alone.
    """
    cfg = TrainConfig.from_dict(options)
    bundle, data_record = resolve_data(data, **(data_options or {}))
    if labeled is not None:
        keep = labeled_mask(bundle.train.y, labeled, bundle.num_classes, cfg.seed)
        bundle = dataclasses.replace(bundle, train=Split(bundle.train.x[keep], bundle.train.y[keep]))
    seed_everything(cfg.seed, cfg.deterministic)  # the initial weights follow --seed
    net = build_model(model, bundle, **(model_kwargs or {}))
    record = {"command": "train", "data": data_record, "model": model_spec(net), "train": cfg.to_dict(),
              **({"labeled": labeled} if labeled is not None else {})}
    return train_and_report(net, bundle, cfg, out, record, objective=None, resume=resume, overwrite=overwrite)


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """What `kdq train` and `kdq distill` share: the model, the run directory, data and training."""
    parser.add_argument("--model", required=True, help="zoo model name (see `kdq models`)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE", help="model keyword argument")
    add_run_options(parser)


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(out=args.out, resume=args.resume, overwrite=args.overwrite, model_kwargs=parse_model_args(args.model_arg),
                data_options=data_options(args), **train_options(args))


def report(run: Run, out: str) -> None:
    if not distributed.is_primary():  # under torchrun rank 0 reports for all
        return
    print_results(run.results)
    print(f"wrote {Path(out)}/ (model.safetensors, model.json, results.json, metrics.jsonl)", file=sys.stderr)


def _arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    parser.add_argument("--labeled", type=int, metavar="N",
                        help="train on the N training images `kdq distill --labeled N` keeps labels for (same --seed)")
    add_data_options(parser)
    add_train_options(parser)


def _cli(args: argparse.Namespace) -> None:
    report(train(args.model, args.data, labeled=args.labeled, **common_options(args)), args.out)


STAGES.register(StageKind("train", train, "train a model with cross-entropy", writes="float",
                          add_arguments=_arguments, run_cli=_cli, distributed=True))
