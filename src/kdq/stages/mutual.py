"""`kdq mutual` / `kdq.stages.mutual.mutual` / YAML `kind: mutual`: deep mutual learning.

Two or more students, none pretrained, learn together from the labels and from each other
(kdq.distill.online.MutualLearning). `out` is a folder of runs: out/student0, out/student1, ...
are normal float run directories (kdq evaluate, export, quantize and qat read them), and the
training files (checkpoint.pt, metrics.jsonl, best*.safetensors, config.yaml) lie in `out`
itself, so `resume` continues every student at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from torch import nn

from kdq.data import DataBundle
from kdq.distill.online import ONE_STUDENT, MutualLearning
from kdq.engine import TrainConfig, distributed, fit, seed_everything
from kdq.engine.evaluate import predict
from kdq.errors import KdqError, short_repr
from kdq.models.registry import model_info
from kdq.rundir.claim import claim
from kdq.rundir.layout import WEIGHTS, write_config
from kdq.rundir.load import data_meta, resolve_data, save_model
from kdq.stages.common import Run, build_model, fit_summary, model_spec, plot_curves, record_results
from kdq.stages.evaluate import evaluate
from kdq.stages.options import add_data_options, add_run_options, add_train_options, print_results
from kdq.stages.registry import STAGES, StageKind
from kdq.stages.train import common_options


def student_dir(out: str | Path, k: int) -> Path:
    """Where student k's run directory lies in a mutual-learning folder."""
    return Path(out) / f"student{k}"


def mutual(
    models: list[str | nn.Module],
    data: str | DataBundle = "fashion-mnist",
    *,
    temperature: float = 1.0,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    model_kwargs: dict[str, Any] | list[dict[str, Any]] | None = None,
    data_options: dict[str, Any] | None = None,
    **options: Any,
) -> list[Run]:
    """Train `models` (zoo names or modules, two or more) together by deep mutual learning;
    options are TrainConfig fields, shared by every student. Returns one Run per student.

    `model_kwargs` is one mapping for every student, or a list of one per student. Students of
    the same architecture start from different weights (drawn one after another from --seed).
    The best epoch is chosen by the first student's validation accuracy and every student is
    restored to that epoch; each student's results.json has its own test accuracy and
    best_val_accuracy at that epoch. `out` is claimed as a folder of runs (kind "recipe").
    """
    distributed.require_one_process("mutual learning")
    check_mutual({"models": models, "temperature": temperature})
    kwargs = _model_kwargs(model_kwargs, len(models))
    cfg = TrainConfig.from_dict(options)
    bundle, data_record = resolve_data(data, **(data_options or {}))
    seed_everything(cfg.seed, cfg.deterministic)  # the initial weights follow --seed
    nets = [build_model(m, bundle, **kw) for m, kw in zip(models, kwargs)]
    objective = MutualLearning(nets[1:], temperature, label_smoothing=cfg.label_smoothing)
    common = {"command": "mutual", "data": data_record, "train": cfg.to_dict()}
    record = {**common, "models": [model_spec(n) for n in nets], "mutual": {"temperature": temperature}}
    if out is None:
        return _fit_and_save(nets, objective, bundle, cfg, None, common, temperature, resume=False)
    with claim(out, "recipe", "mutual", resume=resume, overwrite=overwrite, record=record):
        write_config(Path(out), record)
        return _fit_and_save(nets, objective, bundle, cfg, Path(out), common, temperature, resume=resume)


def _fit_and_save(nets, objective, bundle, cfg, out, common, temperature, *, resume) -> list[Run]:  # noqa: ANN001
    start = time.perf_counter()
    result = fit(nets[0], bundle, cfg, out, objective=objective, resume=resume)  # peers: restored to the best epoch too
    train_time = time.perf_counter() - start
    if out is not None:
        plot_curves(out, title=" + ".join(_name(n) for n in nets))
    runs = []
    for k, net in enumerate(nets):
        record = {**common, "model": model_spec(net),
                  "mutual": {"student": k, "students": len(nets), "temperature": temperature}}
        summary = {**fit_summary(result, train_time), "best_val_accuracy": _val_accuracy(net, bundle, cfg),
                   "mutual": {"student": k, "students": len(nets), "best_epoch_chosen_by": "student0"}}
        if out is None:
            results = {**evaluate(net, bundle), **summary}
            runs.append(Run(net, None, results, result, record))
            continue
        run_dir = student_dir(out, k)
        with claim(run_dir, "float", "mutual", resume=resume):  # its config.yaml is rewritten: no resume check
            write_config(run_dir, record)
            save_model(run_dir, net, data_meta(bundle))
            results = {**evaluate(net, bundle, weights=run_dir / WEIGHTS), **summary}
            record_results(run_dir, results, bundle)
        runs.append(Run(net, run_dir, results, result, record))
    return runs


def _val_accuracy(net: nn.Module, bundle: DataBundle, cfg: TrainConfig) -> float:
    """The student's validation accuracy as restored (the best epoch of student 0)."""
    logits = predict(net, bundle.val.x, cfg.eval_batch_size)
    return (logits.argmax(1).cpu() == bundle.val.y.cpu()).float().mean().item()


def _name(net: nn.Module) -> str:
    return str(model_spec(net).get("name") or model_spec(net).get("class"))


def _model_kwargs(model_kwargs: Any, count: int) -> list[dict[str, Any]]:
    if model_kwargs is None or isinstance(model_kwargs, dict):
        return [dict(model_kwargs or {}) for _ in range(count)]
    if isinstance(model_kwargs, (list, tuple)) and len(model_kwargs) == count \
            and all(isinstance(kw, dict) for kw in model_kwargs):
        return [dict(kw) for kw in model_kwargs]
    raise KdqError(f"model_kwargs must be one mapping for every student or a list of {count} mappings, "
                   f"got {short_repr(model_kwargs)}")


def check_mutual(options: dict[str, Any], train: dict[str, Any] | None = None) -> None:
    """The students and the temperature, checked before any work (a YAML stage's check too)."""
    models = options.get("models")
    if not isinstance(models, (list, tuple)):
        raise KdqError(f"models must be a list of two or more model names, e.g. [resnet8, cnn-small]; "
                       f"got {short_repr(models)}")
    if len(models) < 2:
        raise KdqError(f"{ONE_STUDENT}, got {len(models)}; give two or more (--model A --model B, or models: [A, B])")
    for m in models:
        if isinstance(m, str):
            model_info(m)  # an unknown name: one line with the closest names
        elif not isinstance(m, nn.Module):
            raise KdqError(f"models must name zoo models (see `kdq models`) or be modules, got {short_repr(m)}")
    if len({id(m) for m in models if isinstance(m, nn.Module)}) < sum(isinstance(m, nn.Module) for m in models):
        raise KdqError("models lists the same module twice; give each student its own module")
    MutualLearning([nn.Identity()], options.get("temperature", 1.0))  # its own checks of the temperature


def _collect(stage: Any, runs: list[Run]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """One row per student in the experiment's table: <stage>/student<k>."""
    rows = {f"{stage.name}/{run.dir.name}": {**run.results, "arch": _name(run.model)} for run in runs}
    return rows, []


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="NAME",
                        help="a student's zoo model name (see `kdq models`); repeat it for every student, two or more")
    parser.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="model keyword argument, given to every student")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T of the KL terms (default 1)")
    add_run_options(parser)
    add_data_options(parser)
    add_train_options(parser)


def _cli(args: argparse.Namespace) -> None:
    runs = mutual(args.model, args.data, temperature=args.temperature, **common_options(args))
    for run in runs:
        print(f"{run.dir.name if run.dir else 'student'}:", file=sys.stderr)
        print_results(run.results)
    print(f"wrote {args.out}/ (student0 ... student{len(runs) - 1}/ run directories, metrics.jsonl, checkpoint.pt)",
          file=sys.stderr)


STAGES.register(StageKind("mutual", mutual, "train two or more students together by deep mutual learning",
                          writes="recipe", add_arguments=_arguments, run_cli=_cli, check=check_mutual,
                          collect=_collect))
