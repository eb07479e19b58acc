"""`kdq born-again` / YAML `kind: born-again`: born-again networks (Furlanello et al., ICML 2018).

Generation 1 of `model` is distilled from the teacher, generation k from generation k-1, each
a normal float run directory out/gen<k> (kdq.stages.distill.distill); with `ensemble` the mean
of the generations' logits is scored too, in out/ensemble.json (scored, not saved as a model).
`distill_chain` also runs the teacher-assistant chain over model size (kdq.stages.takd_size).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kdq.data import DataBundle
from kdq.distill import method_spec
from kdq.distill.objective import Method
from kdq.distill.teacher import TEACHER_MODES, Ensemble
from kdq.engine import TrainConfig
from kdq.engine.config import SEED_MAX
from kdq.errors import KdqError, short_repr
from kdq.io import write_json
from kdq.rundir.claim import claim, run_state
from kdq.rundir.layout import read_results, write_config
from kdq.rundir.load import load_teacher, resolve_data
from kdq.stages.common import build_model
from kdq.stages.distill import check_kd, distill, method_arguments
from kdq.stages.evaluate import evaluate
from kdq.stages.options import (
    add_data_options,
    add_run_options,
    add_train_options,
    data_options,
    parse_model_args,
    print_results,
    train_options,
)
from kdq.stages.registry import STAGES, StageKind

ENSEMBLE_FILE = "ensemble.json"


def check_generations(generations: Any) -> int:
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise KdqError(f"generations must be an integer >= 1 (generation 1 learns from the teacher), "
                       f"got {short_repr(generations)}")
    return generations


def teacher_source(teacher: Any) -> str | Path | nn.Module:
    """A run directory, a module, or what an earlier stage returned (its Run: directory, else model)."""
    if isinstance(teacher, (str, Path, nn.Module)):
        return teacher
    run_dir, model = getattr(teacher, "dir", None), getattr(teacher, "model", None)
    if run_dir is not None or isinstance(model, nn.Module):
        return run_dir if run_dir is not None else model
    raise KdqError(f"teacher must be a run directory, a module or a stage's Run, got {short_repr(teacher)}")


def distill_chain(links: Sequence[tuple[str, str | nn.Module, int]], teacher: Any, bundle: DataBundle, out: Path, *,
                  resume: bool, distill_options: dict[str, Any], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Distil each (folder, model, seed) of `links` from the one before (the first from `teacher`)
    into out/<folder>; {folder: results}. With `resume`, finished links are kept and an
    interrupted one continues from its checkpoint."""
    results: dict[str, dict[str, Any]] = {}
    source = teacher_source(teacher)
    for folder, model, seed in links:
        run_dir = out / folder
        if resume and run_state(run_dir).status == "finished":
            print(f"   keeping finished {run_dir}", file=sys.stderr)
            results[folder] = read_results(run_dir)
        else:
            student = copy.deepcopy(model) if isinstance(model, nn.Module) else model  # each link starts afresh
            run = distill(student, source, bundle, out=run_dir, resume=resume, **distill_options, **{**options, "seed": seed})
            results[folder] = run.results
        source = run_dir
    return results


def chain_record(command: str, model: Any, teacher: Any, data: dict[str, Any], cfg: TrainConfig,
                 distill_options: dict[str, Any]) -> dict[str, Any]:
    """What the chain's config.yaml records: a resumed chain must keep it (kdq.rundir.claim.check_resume),
    so finished links are never kept from other options."""
    source = teacher_source(teacher)
    named = lambda v: type(v).__name__ if isinstance(v, nn.Module) else v  # noqa: E731
    options = {k: v for k, v in distill_options.items() if v is not None}
    return {"command": command, "data": data, "model": named(model), "teacher": str(named(source)),
            "distill": json.loads(json.dumps(options, default=str)), "train": cfg.to_dict()}


def check_chain_options(method: Any, temperature: Any, alpha: Any, teacher_mode: Any, features: Any,
                        options: dict[str, Any], last_seed_offset: int = 0) -> TrainConfig:
    """The distillation and training options of every link, checked before any work."""
    if teacher_mode not in TEACHER_MODES:
        raise KdqError(f"teacher_mode must be one of {', '.join(TEACHER_MODES)}, got {short_repr(teacher_mode)}")
    check_kd({"method": method, "temperature": temperature, "alpha": alpha, "teacher_mode": teacher_mode,
              "features": features}, options)
    cfg = TrainConfig.from_dict(options)
    if cfg.seed + last_seed_offset > SEED_MAX:
        raise KdqError(f"seed {cfg.seed} + {last_seed_offset} (the last generation's) exceeds {SEED_MAX}; give a smaller seed")
    return cfg


def born_again(
    model: str | nn.Module,
    teacher: Any,
    data: str | DataBundle = "fashion-mnist",
    *,
    generations: int = 2,
    ensemble: bool = False,
    method: Method = "kd",
    temperature: float = 4.0,
    alpha: float = 0.7,
    teacher_mode: str = "online",
    features: list[str] | None = None,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    data_options: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Born-again generations of `model` in out/gen1 ... out/gen<generations>; {"gen<k>": results,
    and "ensemble": the mean-logit ensemble's results when `ensemble`}.

    Generation k trains with seed + k - 1, so generations start from different weights (a
    module given as `model` is copied, so every generation starts from its weights). `method`,
    `temperature`, `alpha`, `teacher_mode` and `features` are kdq.stages.distill.distill's;
    `resume` keeps finished generations and continues an interrupted one.
    """
    generations = check_generations(generations)
    cfg = check_chain_options(method, temperature, alpha, teacher_mode, features, options, generations - 1)
    bundle, data_record = resolve_data(data, **(data_options or {}))
    build_model(model, bundle, **(model_kwargs or {}))  # an unknown model or option fails before any training
    load_teacher(teacher_source(teacher), bundle)  # so does a teacher trained on other data
    links = [(f"gen{k}", model, cfg.seed + k - 1) for k in range(1, generations + 1)]
    distill_options = dict(method=method, temperature=temperature, alpha=alpha, teacher_mode=teacher_mode,
                           features=features, model_kwargs=model_kwargs)
    record = chain_record("born-again", model, teacher, data_record, cfg, distill_options)
    out = Path(out)
    with claim(out, "recipe", "born-again", resume=resume, overwrite=overwrite, record=record):
        write_config(out, record)
        results = distill_chain(links, teacher, bundle, out, resume=resume, distill_options=distill_options,
                                options=options)
        (out / ENSEMBLE_FILE).unlink(missing_ok=True)  # never a stale score of other generations
        if ensemble:
            members = Ensemble([load_teacher(out / folder, bundle) for folder, _, _ in links])
            scored = evaluate(members, bundle)
            scored["generations"] = generations
            write_json(out / ENSEMBLE_FILE, scored)
            results["ensemble"] = scored
    return results


def _check(options: dict[str, Any], train: dict[str, Any]) -> None:
    check_generations(options.get("generations", 2))
    check_kd(options, train)


def _collect(stage: Any, results: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """One row per generation (and the ensemble's) in the experiment's table."""
    rows = {}
    for name, r in results.items():
        arch = f"{stage.model} x{r['generations']} mean logits" if name == "ensemble" else stage.model
        rows[f"{stage.name}/{name}"] = {**r, "arch": arch}
    return rows, []


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="zoo model name of every generation (see `kdq models`)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE", help="model keyword argument")
    parser.add_argument("--teacher", required=True, help="run directory of the teacher of generation 1")
    parser.add_argument("--generations", type=int, default=2, help="how many generations (default 2)")
    parser.add_argument("--ensemble", action="store_true", help="also score the mean of the generations' logits (ensemble.json)")
    chain_arguments(parser)
    add_run_options(parser)
    add_data_options(parser)
    add_train_options(parser)


def chain_arguments(parser: argparse.ArgumentParser) -> None:
    """What the distillation chains share with `kdq distill`: T, alpha, teacher mode, method."""
    parser.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T (default 4)")
    parser.add_argument("--alpha", type=float, default=0.7, help="weight of the soft term (default 0.7)")
    parser.add_argument("--teacher-mode", choices=TEACHER_MODES, default="online",
                        help="run each teacher on every batch, or once over the training set (logit methods only)")
    method_arguments(parser, "--method")


def chain_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(method=method_spec(args.method, args.method_option) or "kd", temperature=args.temperature,
                alpha=args.alpha, teacher_mode=args.teacher_mode, features=args.feature, out=args.out,
                resume=args.resume, overwrite=args.overwrite, data_options=data_options(args), **train_options(args))


def print_chain(results: dict[str, dict[str, Any]], out: str | Path) -> None:
    """Each run's accuracy, then the last run's full results."""
    for name, r in results.items():
        print(f"{name}: accuracy {r['accuracy']:.4f}", file=sys.stderr)
    print_results(next(reversed(results.values())))
    print(f"wrote {out}/ ({', '.join(results)})", file=sys.stderr)


def _cli(args: argparse.Namespace) -> None:
    results = born_again(args.model, args.teacher, args.data, generations=args.generations, ensemble=args.ensemble,
                         model_kwargs=parse_model_args(args.model_arg), **chain_options(args))
    print_chain(results, args.out)


STAGES.register(StageKind("born-again", born_again, "born-again networks: generations each taught by the one before",
                          writes="recipe", add_arguments=_arguments, run_cli=_cli, check=_check, collect=_collect))
