"""`kdq takd-size` / YAML `kind: takd-size`: teacher assistants over model size (Mirzadeh et al., AAAI 2020).

teacher -> models[0] -> models[1] -> ... each distilled from the one before into out/<i>-<model>
(1-based, normal float run directories); the last is the student. Its comparison with direct
distillation is a plain `distill` stage of the same student beside it in the experiment.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kdq.data import DataBundle
from kdq.distill.objective import Method
from kdq.errors import KdqError, short_repr
from kdq.models.registry import model_info
from kdq.rundir.claim import claim
from kdq.rundir.layout import check_name, write_config
from kdq.rundir.load import load_teacher, resolve_data
from kdq.stages.born_again import (
    chain_arguments,
    chain_options,
    chain_record,
    check_chain_options,
    distill_chain,
    print_chain,
    teacher_source,
)
from kdq.stages.common import build_model
from kdq.stages.distill import check_kd
from kdq.stages.options import add_data_options, add_run_options, add_train_options
from kdq.stages.registry import STAGES, StageKind


def check_models(models: Any) -> list[str]:
    """A non-empty list of registered model names (KdqError naming the first that is not)."""
    if isinstance(models, str) or not isinstance(models, (list, tuple)) or not models:
        raise KdqError(f"models must be a list of at least one model name, the assistants then the student, "
                       f"e.g. [resnet20, resnet8], got {short_repr(models)}")
    for name in models:
        if not isinstance(name, str) or not name:
            raise KdqError(f"models must be model names (see `kdq models`), got {short_repr(name)} in {short_repr(models)}")
        model_info(name)  # an unknown name fails with the closest ones
    return list(models)


def takd_size(
    models: list[str],
    teacher: Any,
    data: str | DataBundle = "fashion-mnist",
    *,
    method: Method = "kd",
    temperature: float = 4.0,
    alpha: float = 0.7,
    teacher_mode: str = "online",
    features: list[str] | None = None,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    data_options: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Distil `teacher` through the assistants `models[:-1]` into the student `models[-1]`;
    {"<i>-<model>": results} in chain order. The options are kdq.stages.distill.distill's and
    apply to every link (give `features` only when every pair has those layers; by default
    each pair is matched by its models' feature_layers()). `resume` keeps finished links."""
    models = check_models(models)
    cfg = check_chain_options(method, temperature, alpha, teacher_mode, features, options)
    bundle, data_record = resolve_data(data, **(data_options or {}))
    links = []
    for i, name in enumerate(models, 1):
        build_model(name, bundle)  # a model too large or unfit for the data fails before any training
        links.append((check_name(f"{i}-{name}", "chain link"), name, cfg.seed))
    load_teacher(teacher_source(teacher), bundle)  # so does a teacher trained on other data
    distill_options = dict(method=method, temperature=temperature, alpha=alpha, teacher_mode=teacher_mode, features=features)
    record = chain_record("takd-size", models, teacher, data_record, cfg, distill_options)
    out = Path(out)
    with claim(out, "recipe", "takd-size", resume=resume, overwrite=overwrite, record=record):
        write_config(out, record)
        return distill_chain(links, teacher, bundle, out, resume=resume, distill_options=distill_options, options=options)


def _check(options: dict[str, Any], train: dict[str, Any]) -> None:
    check_models(options.get("models"))
    check_kd(options, train)


def _collect(stage: Any, results: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """One row per link of the chain in the experiment's table; the last is the student."""
    return {f"{stage.name}/{name}": {**r, "arch": name.split("-", 1)[1]} for name, r in results.items()}, []


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", required=True, help="the assistants then the student, comma-separated, e.g. resnet20,resnet8")
    parser.add_argument("--teacher", required=True, help="run directory of the teacher of the first model")
    chain_arguments(parser)
    add_run_options(parser)
    add_data_options(parser)
    add_train_options(parser)


def _cli(args: argparse.Namespace) -> None:
    models = [m.strip() for m in args.models.split(",")]
    print_chain(takd_size(models, args.teacher, args.data, **chain_options(args)), args.out)


STAGES.register(StageKind("takd-size", takd_size, "teacher assistants over model size: teacher -> assistants -> student",
                          writes="recipe", add_arguments=_arguments, run_cli=_cli, check=_check, collect=_collect))
