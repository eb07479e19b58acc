"""`kdq prune` / `kdq.prune` / YAML `kind: prune`: unstructured or structured pruning of a float run.

    kdq.prune("runs/kd", "runs/kd-90", method="magnitude", sparsity=0.9)             # masks, stored sparse
    kdq.prune("runs/kd", "runs/kd-half", method="channels", macs=2.0, teacher="runs/teacher")

One-shot (`epochs=0`), fine-tuned (the default: a short run, optionally distilled from a
teacher), gradual (magnitude: Zhu & Gupta's schedule over the fine-tuning epochs) or in
`rounds` of prune -> retrain, each retraining rewound (`rewind`):

- "none": fine-tune at the fine-tuning lr (`lr`, default 0.01);
- "lr": learning-rate rewinding (Renda et al. 2020): train from the pruned weights with the
  learning rate the source run had `epochs` epochs before its end, decayed to 0 by a cosine
  over the `epochs` (the source schedule's tail, re-drawn as one cosine from that lr);
- "weights": weight rewinding (Frankle & Carbin 2019; Frankle et al. 2020): the surviving
  weights go back to their values after epoch `rewind_epoch` of the source run (kept there by
  `--keep-epoch`), masks kept, and train with the lr the source had at that epoch, decayed
  by a cosine over `epochs`. Magnitude pruning only (channels removed change every shape).

Every variant trains `epochs` per round, so they compare at equal budget. Rounds before the
last train in out/round-<k>; the last writes `out`, which is a float run every other command
takes. Structured pruning records the new widths in model.json (rebuilt without pickle);
magnitude pruning stores the weights in the sparse format (kdq.prune.sparse).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdq.data import DataBundle
from kdq.distill import method_spec
from kdq.distill.objective import Method
from kdq.engine import TrainConfig, count_params, distributed, fit
from kdq.engine.config import PRUNE_DEFAULTS, RUN_CONTROL_KEYS, TRAIN_KEYS
from kdq.engine.train import build_scheduler
from kdq.errors import KdqError
from kdq.io import load_weights, write_json
from kdq.prune import (
    Channels,
    GradualSchedule,
    Magnitude,
    attach_masks,
    make_permanent,
    prune_channels,
    save_sparse,
    sparsity_of,
    update_masks,
)
from kdq.rundir.claim import claim
from kdq.rundir.layout import BEST, PHASE_FILE, kept_epoch, read_config, round_dir, write_config
from kdq.rundir.load import data_meta, data_record, load_run, run_format, save_model
from kdq.stages.common import primary_results, record_results, zoo_spec
from kdq.stages.distill import check_kd, method_arguments, teacher_record
from kdq.stages.evaluate import evaluate
from kdq.stages.lowbit import teacher_objective
from kdq.stages.options import add_run_options, add_train_options, print_results, train_options
from kdq.stages.registry import STAGES, StageKind

METHODS = ("magnitude", "channels")
REWINDS = ("none", "lr", "weights")
MAGNITUDE_KEYS = ("sparsity", "gradual")
CHANNEL_KEYS = ("ratio", "macs", "params", "importance", "round_to")
TAYLOR_BATCHES = 8  # batches whose loss gradients score channels for importance "taylor"


def prune(
    run: str | Path,
    out: str | Path,
    *,
    method: str = "magnitude",
    sparsity: float | None = None,
    gradual: bool = False,
    ratio: float | None = None,
    macs: float | None = None,
    params: float | None = None,
    importance: str | None = None,
    round_to: int | None = None,
    scope: str = "layer",
    skip: list[str] | None = None,
    rounds: int = 1,
    rewind: str = "none",
    rewind_epoch: int | None = None,
    teacher: str | Path | nn.Module | list[str | Path | nn.Module] | None = None,
    distill_method: Method = "kd",
    temperature: float = 4.0,
    alpha: float = 0.7,
    features: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    data: str | DataBundle | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Prune a float run's model into `out` and fine-tune it (see the module's docstring).

    magnitude: `sparsity` (fraction of conv/linear weights set to zero), `scope` "layer" or
    "global", `gradual`. channels: one of `ratio` (fraction of channels removed), `macs` or
    `params` (a reduction factor, e.g. 2.0), `importance` l1, l2, bn or taylor, `round_to` (kept
    widths a multiple of it), `scope`.
    `skip` names modules left alone. `epochs=0`: one-shot, no fine-tuning.
    """
    run, out = Path(run), Path(out)
    epochs = options.pop("epochs", PRUNE_DEFAULTS["epochs"])
    check_prune_options(method, sparsity=sparsity, gradual=gradual, ratio=ratio, macs=macs, params=params,
                        importance=importance, round_to=round_to, rounds=rounds, rewind=rewind,
                        rewind_epoch=rewind_epoch,
                        epochs=epochs, teacher=teacher)
    cfg = TrainConfig.from_dict({**PRUNE_DEFAULTS, **options, "epochs": max(epochs, 1)})
    source = load_run(run, data)
    if source.format.kind != "float":
        raise KdqError(f"{run} holds an {source.format.kind} model; prune the float run it was made from, then "
                       "quantize the pruned run (prune -> quantize, or prune -> qat)")
    model, bundle = source.model, source.data
    zoo_spec(model, run)  # the pruned model must rebuild from its spec
    config = _config(method, sparsity, ratio, macs, params, importance, round_to, scope, skip)
    rewound = _rewind_weights(run, rewind_epoch) if rewind == "weights" else None
    start_lr = _start_lrs(run, rewind, rewind_epoch, cfg, rounds)
    objective, methods = teacher_objective(teacher, bundle, cfg, distill_method, temperature, alpha, features)
    record = {"command": "prune", "source": str(run), "method": method, "pruning": _config_record(config),
              "gradual": gradual, "rounds": rounds, "rewind": rewind, "rewind_epoch": rewind_epoch,
              "teacher": teacher_record(teacher), "temperature": temperature, "alpha": alpha, **methods,
              "epochs": epochs, "train": cfg.to_dict(), "data": data_record(bundle)}
    params_before = count_params(model)
    primary = distributed.is_primary()
    with distributed.primary_only(claim(out, "float", "prune", resume=resume, overwrite=overwrite, record=record), out):
        if primary:
            write_config(out, record)
        started = time.perf_counter()
        if method == "magnitude":
            attach_masks(model, config)
        report: dict[str, Any] = {}
        for k in range(1, rounds + 1):
            where = out if k == rounds else out / round_dir(k)
            report = _round(model, config, k, rounds, bundle, cfg, start_lr[k - 1], epochs, gradual, rewound,
                            where, resume, teacher, distill_method, temperature, alpha, features, objective)
        if not primary:  # under torchrun: rank 0 saves, scores and writes; the others take its results
            return primary_results(out)
        if method == "magnitude":
            make_permanent(model)
            save_sparse(out, model, data_meta(bundle))
        else:
            save_model(out, model, data_meta(bundle))
        results = evaluate(model, bundle, weights=out / run_format(out).tensors)
        report.update(params_before=params_before, params_after=count_params(model))
        if method == "magnitude":  # each layer's sparsity (channels: the report has each layer's kept channels)
            report["layers"] = sparsity_of(model)["layers"]
        fitted = {k: report.pop(k) for k in ("best_epoch", "best_val_accuracy") if k in report}  # the last round's
        results.update(pruning=report, **fitted, train_time_s=time.perf_counter() - started)
        record_results(out, results, bundle, title=f"{getattr(model, 'kdq_spec', {}).get('name')} {method} pruning")
    distributed.barrier()
    return results


def _round(model, config, k, rounds, bundle, cfg, lr, epochs, gradual, rewound, where, resume,  # noqa: ANN001, PLR0913
           teacher, distill_method, temperature, alpha, features, objective) -> dict[str, Any]:  # noqa: ANN001
    """Prune (round k of `rounds`), rewind if asked, retrain into `where`; what the pruning did.

    A finished round before the last (its phase.json written) is reloaded when resuming: the
    pruning step itself is a function of the weights it starts from, so it is simply redone."""
    on_epoch_start, best_from = None, 1
    if isinstance(config, Magnitude):
        if gradual:
            schedule = GradualSchedule(config.sparsity, epochs, scope=config.scope, skip=config.skip)
            on_epoch_start = schedule.on_epoch_start(model)
            best_from = schedule.end + 1  # the best epoch is one at the final sparsity
        else:
            update_masks(model, 1 - (1 - config.sparsity) ** (k / rounds), config.scope)
        if rewound is not None:
            _load_rewound(model, rewound)
        report = {"round": k}
    else:
        report = prune_channels(model, bundle.train.x[:2], _round_channels(config, rounds),
                                batches=_taylor_batches(bundle, cfg) if config.importance == "taylor" else None)
    if epochs == 0:
        return report
    intermediate = k < rounds
    if intermediate and resume and (where / PHASE_FILE).exists():
        model.load_state_dict(load_weights(where / BEST))
        return report
    if k > 1 and teacher is not None:  # channels removed change the student's shapes: adapters anew
        objective, _ = teacher_objective(teacher, bundle, cfg, distill_method, temperature, alpha, features)
    round_cfg = TrainConfig.from_dict({**cfg.to_dict(), "lr": lr, "epochs": epochs})
    result = fit(model, bundle, round_cfg, where, objective=objective, resume=resume and where.exists(),
                 on_epoch_start=on_epoch_start, best_from=best_from)
    if intermediate and distributed.is_primary():
        write_json(where / PHASE_FILE, {"round": k, "best_epoch": result.best_epoch,
                                        "best_val_accuracy": result.best_val_accuracy})
    return {**report, "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy}


def _round_channels(config: Channels, rounds: int) -> Channels:
    """One round's share of a channel target: `rounds` equal steps that compound to it."""
    if rounds == 1:
        return config
    share = {}
    if config.ratio is not None:
        share["ratio"] = 1 - (1 - config.ratio) ** (1 / rounds)
    for key in ("macs", "params"):
        if getattr(config, key) is not None:
            share[key] = getattr(config, key) ** (1 / rounds)
    return Channels(**{**_config_record(config), **share})


def _taylor_batches(bundle: DataBundle, cfg: TrainConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, seeded sample of training batches for the Taylor importance's gradients."""
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(bundle.train), generator=gen)[: TAYLOR_BATCHES * cfg.batch_size]
    return [(bundle.train.x[i], bundle.train.y[i]) for i in order.split(cfg.batch_size)]


def _config(method, sparsity, ratio, macs, params, importance, round_to, scope, skip) -> Magnitude | Channels:  # noqa: ANN001
    skip = tuple(skip or ())
    if method == "magnitude":
        return Magnitude(sparsity=sparsity, scope=scope, skip=skip)
    return Channels(ratio=ratio, macs=macs, params=params, importance=importance or "l2", scope=scope, skip=skip,
                    round_to=1 if round_to is None else round_to)


def _config_record(config: Magnitude | Channels) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}


def _lr_at(train: dict[str, Any], epoch: float) -> float:
    """The learning rate a run's schedule had at the start of `epoch` (0-based)."""
    cfg = TrainConfig.from_dict({k: v for k, v in train.items() if k in TRAIN_KEYS})
    steps = 100  # per epoch: the schedules are functions of the fraction of training done
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = build_scheduler(opt, cfg, steps)
    for _ in range(round(min(epoch, cfg.epochs) * steps)):
        opt.step()
        schedule.step()
    return opt.param_groups[0]["lr"]


def _start_lrs(run: Path, rewind: str, rewind_epoch: int | None, cfg: TrainConfig, rounds: int) -> list[float]:
    """Each round's starting lr: the fine-tuning lr, or the source schedule's at the rewind point."""
    if rewind == "none":
        return [cfg.lr] * rounds
    train = read_config(run).get("train")
    if not isinstance(train, dict) or "epochs" not in train:
        raise KdqError(f"{run}/config.yaml records no training schedule to rewind; use --rewind none")
    epoch = rewind_epoch if rewind == "weights" else max(0, train["epochs"] - cfg.epochs)
    lr = _lr_at(train, epoch)
    if not lr > 0:
        raise KdqError(f"the source's learning rate after epoch {epoch} of its {train['epochs']} is 0 (its schedule "
                       "ended there), so rewinding to it would not train; rewind to an earlier epoch")
    return [lr] * rounds


def _rewind_weights(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    path = run / kept_epoch(epoch)
    if not path.exists():
        raise KdqError(f"{run} kept no weights of epoch {epoch} ({path.name}); retrain it with --keep-epoch {epoch} "
                       "(YAML keep_epoch), or rewind the learning rate instead (--rewind lr)")
    return load_weights(path)


def _load_rewound(model: nn.Module, rewound: dict[str, torch.Tensor]) -> None:
    """The kept weights into a masked model: each weight_orig from the plain weight, masks kept."""
    own = model.state_dict()
    state = {}
    for key, value in own.items():
        if key.endswith("_mask"):
            state[key] = value
            continue
        name = key.removesuffix("_orig")
        if name not in rewound:
            raise KdqError(f"the rewound weights have no {name!r}: they were saved from another architecture")
        state[key] = rewound[name]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise KdqError(f"the rewound weights do not fit the model: {str(exc).splitlines()[0]}") from None


def check_prune_options(method: Any, *, sparsity: Any, gradual: Any, ratio: Any, macs: Any, params: Any,
                        importance: Any, round_to: Any, rounds: Any, rewind: Any, rewind_epoch: Any, epochs: Any,
                        teacher: Any) -> None:
    """Options that make sense together, refused in one line before anything is loaded."""
    if method not in METHODS:
        raise KdqError(f"pruning method must be magnitude (unstructured) or channels (structured), got {method!r}")
    given = {"sparsity": sparsity, "gradual": gradual or None, "ratio": ratio, "macs": macs, "params": params,
             "importance": importance, "round_to": round_to}
    other = [k for k in (CHANNEL_KEYS if method == "magnitude" else MAGNITUDE_KEYS) if given[k] is not None]
    if other:
        raise KdqError(f"{other[0]} is an option of the {'channels' if method == 'magnitude' else 'magnitude'} "
                       f"method, not {method}")
    if method == "magnitude" and sparsity is None:
        raise KdqError("magnitude pruning needs sparsity, the fraction of weights to zero, e.g. --sparsity 0.9")
    if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0):
        raise KdqError(f"epochs must be a whole number >= 0 (0: one-shot, no fine-tuning), got {epochs!r}")
    if not (isinstance(rounds, int) and not isinstance(rounds, bool) and 1 <= rounds <= 100):
        raise KdqError(f"rounds must be a whole number from 1 to 100, got {rounds!r}")
    if rewind not in REWINDS:
        raise KdqError(f"rewind must be none, lr or weights, got {rewind!r}")
    if rewind == "weights":
        if method != "magnitude":
            raise KdqError("weight rewinding needs the pruned weights' old values, which removing channels changes; "
                           "use --rewind lr with channels")
        if not (isinstance(rewind_epoch, int) and not isinstance(rewind_epoch, bool) and rewind_epoch >= 0):
            raise KdqError(f"--rewind weights needs --rewind-epoch N >= 0 (an epoch the source kept with --keep-epoch), "
                           f"got {rewind_epoch!r}")
    elif rewind_epoch is not None:
        raise KdqError("rewind_epoch applies only with rewind weights")
    if gradual and rounds > 1:
        raise KdqError("gradual pruning is one schedule over the fine-tuning epochs; use it with rounds 1")
    if gradual and epochs < 2:
        raise KdqError(f"gradual pruning needs at least 2 fine-tuning epochs, got {epochs}")
    if epochs == 0 and (rewind != "none" or teacher is not None or rounds > 1):
        what = "rewinding" if rewind != "none" else "a teacher" if teacher is not None else "rounds"
        raise KdqError(f"{what} needs fine-tuning epochs; give epochs >= 1 (0 is one-shot pruning)")


def _check(options: dict[str, Any], train: dict[str, Any]) -> None:
    """A YAML prune stage: its options, its pruning config and its teacher's, before any work."""
    method = options.get("method", "magnitude")
    epochs = options.get("epochs", PRUNE_DEFAULTS["epochs"])
    check_prune_options(method, **{k: options.get(k) for k in ("sparsity", "ratio", "macs", "params", "importance",
                                                                 "round_to", "rewind_epoch")},
                        gradual=options.get("gradual", False), rounds=options.get("rounds", 1),
                        rewind=options.get("rewind", "none"), epochs=epochs, teacher=options.get("teacher"))
    _config(method, options.get("sparsity"), options.get("ratio"), options.get("macs"), options.get("params"),
            options.get("importance"), options.get("round_to"), options.get("scope", "layer"), options.get("skip"))
    TrainConfig.from_dict({**PRUNE_DEFAULTS, **train, "epochs": max(epochs, 1)})
    if "teacher" in options:
        check_kd(options, train, "distill_method")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory of a float model (prune before quantizing)")
    add_run_options(parser)
    parser.add_argument("--method", dest="prune_method", choices=METHODS, default="magnitude",
                        help="magnitude: unstructured weights set to zero; channels: channels and filters removed")
    group = parser.add_argument_group("magnitude pruning")
    group.add_argument("--sparsity", type=float, help="fraction of conv/linear weights set to zero, in [0, 1)")
    group.add_argument("--gradual", action="store_true",
                       help="raise the sparsity over the fine-tuning epochs (Zhu & Gupta's cubic schedule)")
    group = parser.add_argument_group("channel pruning (one of --ratio, --macs, --params)")
    group.add_argument("--ratio", type=float, help="fraction of channels removed, in [0, 1)")
    group.add_argument("--macs", type=float, help="a target: this many times fewer MACs, e.g. 2")
    group.add_argument("--params", type=float, help="a target: this many times fewer parameters, e.g. 2")
    group.add_argument("--importance", choices=("l1", "l2", "bn", "taylor"),
                       help="how channels are ranked: filter L1/L2 norm (default l2), batch-norm scale, first-order Taylor")
    group.add_argument("--round-to", type=int, metavar="N",
                       help="keep every pruned width a multiple of N (8 or 16 suit ONNX Runtime's blocked kernels)")
    parser.add_argument("--scope", choices=("layer", "global"), default="layer",
                        help="the same fraction in every layer, or one ranking over all layers")
    parser.add_argument("--skip", action="append", metavar="MODULE", help="a module left unpruned (repeatable)")
    group = parser.add_argument_group("rounds and rewinding")
    group.add_argument("--rounds", type=int, default=1, help="prune -> retrain rounds that compound to the target")
    group.add_argument("--rewind", choices=REWINDS, default="none",
                       help="each retraining: fine-tune (none), rewind the learning rate (lr) or the weights (weights)")
    group.add_argument("--rewind-epoch", type=int, help="--rewind weights: the source epoch kept with --keep-epoch")
    parser.add_argument("--teacher", action="append",
                        help="distill from this run directory while fine-tuning (repeat: the teachers' mean logits)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    method_arguments(parser, "--distill-method")
    add_train_options(parser, PRUNE_DEFAULTS, {"epochs": "0: one-shot, no fine-tuning"})


def _cli(args: argparse.Namespace) -> None:
    teacher = args.teacher[0] if args.teacher and len(args.teacher) == 1 else args.teacher
    results = prune(args.run, args.out, method=args.prune_method, sparsity=args.sparsity, gradual=args.gradual,
                    ratio=args.ratio, macs=args.macs, params=args.params, importance=args.importance,
                    round_to=args.round_to,
                    scope=args.scope, skip=args.skip, rounds=args.rounds, rewind=args.rewind,
                    rewind_epoch=args.rewind_epoch, teacher=teacher, temperature=args.temperature, alpha=args.alpha,
                    distill_method=method_spec(args.method, args.method_option) or "kd", features=args.feature,
                    resume=args.resume, overwrite=args.overwrite, **train_options(args))
    if not distributed.is_primary():
        return
    print_results(results)
    print(f"wrote {args.out}/ (results.json)", file=sys.stderr)


STAGES.register(StageKind(
    "prune", prune, "prune a float run: weights zeroed (magnitude) or channels removed (channels), then fine-tune",
    writes="float", check=_check, add_arguments=_arguments, run_cli=_cli,
    # fine-tuning keeps its own gentle defaults: only the run-control defaults carry over
    inherit=RUN_CONTROL_KEYS,
    arch=lambda model, options: f"{model} {options.get('method', 'magnitude')}", distributed=True,
))
