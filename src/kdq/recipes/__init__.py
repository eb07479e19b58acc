"""Quantization-aware distillation recipes: how a float model becomes a family of low-bit ones.

    from kdq import recipes
    recipes.run_recipe("takd-chain", "runs/teacher", "runs/chain", bits=["w16a16", "w8a8", "w4a4", "w2a2", "w1a2"])
    rows = recipes.sweep("apprentice", "runs/teacher", "runs/sweep/apprentice", bits=["w8a8", "w4a4"], seeds=[0, 1])

One file per family: `bits` (individual, apprentice, takd-chain), `qkd`, `speq`. Every recipe
writes one low-bit run directory per scheme, out/<scheme>/ (`kdq evaluate` and `kdq export
--format packed` read them), and returns {scheme: results}. With `resume=True` a scheme that
already has results is kept and an interrupted one continues from its checkpoint.

This module is also the `recipe` stage: `kdq recipe`, YAML `kind: recipe` and `sweep`.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdq.data import DataBundle
from kdq.distill import KDLoss, method_losses, method_spec
from kdq.engine import distributed
from kdq.engine.config import FINE_TUNE_DEFAULTS, QKD_PHASE_EPOCHS, RUN_CONTROL_KEYS, SEED_MAX, TRAIN_KEYS
from kdq.errors import KdqError, suggest
from kdq.io import write_text
from kdq.recipes import bits, qkd, speq  # noqa: F401 - each registers its recipes
from kdq.recipes.common import CHECKS, RECIPES, schemes, seed_position
from kdq.report.sweep import plot_sweep, size_table, sweep_table
from kdq.rundir.claim import claim
from kdq.rundir.layout import SWEEP_MD, SWEEP_PNG, read_results
from kdq.stages.registry import STAGES, StageKind
from kdq.stages.distill import method_arguments
from kdq.stages.lowbit import fine_tune_config, lowbit_config
from kdq.stages.options import add_train_options, first_last_bits, int_list, train_options

__all__ = ["RECIPES", "run_recipe", "sweep", "write_report", "check_recipe"]


def run_recipe(name: str, source: str | Path, out: str | Path, *, overwrite: bool = False,
               **options: Any) -> dict[str, dict[str, Any]]:
    """Run recipe `name` (see RECIPES) from float run `source` into `out`; {scheme: results}.

    `out` must be new or empty, unless `resume=True` keeps its finished schemes (and resumes
    interrupted ones) or `overwrite` replaces it.
    """
    check_recipe(name, options)
    claimed = claim(out, "recipe", "recipe", resume=bool(options.get("resume")), overwrite=overwrite)
    with distributed.primary_only(claimed, out):  # under torchrun only rank 0 claims and writes
        return RECIPES.get(name)(source, out, **options)


def sweep(name: str, source: str | Path, out: str | Path, *, seeds: Sequence[int] = (0,), overwrite: bool = False,
          **options: Any) -> list[dict[str, Any]]:
    """Run a recipe once per seed into out/seed<k>; one report row per (scheme, seed).

    Rows are what `kdq.report.sweep` tabulates and plots: recipe, bits, seed, accuracy,
    size_bytes and the float model's float_size_bytes. `resume` and `overwrite` as in run_recipe.
    """
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= SEED_MAX for s in seeds):
        raise KdqError(f"seeds must be a non-empty list of integers from 0 to {SEED_MAX}, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise KdqError(f"seeds lists a seed twice: {seeds}; a repeated seed repeats the same run, so give different seeds")
    check_recipe(name, {**options, "seed": seeds[0]})  # before anything is written
    float_size = read_results(source).get("size_bytes")
    rows = []
    claimed = claim(out, "recipe", "recipe", resume=bool(options.get("resume")), overwrite=overwrite)
    with distributed.primary_only(claimed, out):
        for index, seed in enumerate(seeds):
            with seed_position(index, len(seeds)):  # each scheme announced as one of all the sweep's runs
                results = run_recipe(name, source, Path(out) / f"seed{seed}", **{**options, "seed": seed})
            rows += [{"recipe": name, "bits": scheme, "seed": seed, "accuracy": r["accuracy"],
                      "size_bytes": r["size_bytes"], "float_size_bytes": float_size, "run": r.get("run_dir")}
                     for scheme, r in results.items()]
    return rows


def write_report(rows: list[dict[str, Any]], out: str | Path, reference: float | None, title: str,
                 float_name: str = "float") -> str:
    """sweep.md and sweep.png in `out`: accuracy against weight bits per recipe (mean ± std over
    seeds), sizes against k/32 of float + 10%; returns the Markdown."""
    out = Path(out)
    plot_sweep(rows, out / SWEEP_PNG, reference=reference, title=title)
    text = "## Low-bit sweep\n\n" + (f"Float model ({float_name}): {reference:.4f}.\n\n" if reference is not None else "")
    text += sweep_table(rows, reference) + f"\n\n{size_table(rows)}\n\nplot: {SWEEP_PNG}\n"
    write_text(out / SWEEP_MD, text)
    return text


def _own_options(name: str) -> list[str]:
    params = inspect.signature(RECIPES.get(name)).parameters
    return [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY]


def check_recipe(name: str, options: dict[str, Any]) -> None:
    """Reject an unknown recipe, an option it does not take, a bad scheme or value: one line each."""
    if name not in RECIPES:
        raise KdqError(f"unknown recipe {name!r}{suggest(str(name), RECIPES.names())}; choose from {', '.join(RECIPES.names())}")
    own = _own_options(name)
    unknown = [k for k in options if k not in own and k not in TRAIN_KEYS]
    if unknown:
        raise KdqError(f"recipe {name!r} does not take {unknown[0]!r}{suggest(unknown[0], own + list(TRAIN_KEYS))}; "
                       f"it takes {', '.join(own)} and training options")
    fine_tune_config({k: v for k, v in options.items() if k in TRAIN_KEYS})
    for scheme in schemes(options.get("bits")):
        lowbit_config(scheme, options.get("quantizer", "lsq"), options.get("act_quantizer"), options.get("first_last_bits", 8))
    if name in CHECKS:
        CHECKS[name](options)
    # inf or nan here would train to nan: refused before anything is written (KDLoss's own checks)
    KDLoss(options.get("temperature", 1.0), options.get("alpha", 0.7))
    if "distill_method" in options:
        method_losses(options["distill_method"], temperature=options.get("temperature"), alpha=options.get("alpha"))


# ---- the `recipe` stage


def recipe(run: str | Path, out: str | Path, *, recipe: str, seeds: Sequence[int] | None = None,
           data: str | DataBundle | None = None, resume: bool = False, overwrite: bool = False,
           **options: Any) -> list[dict[str, Any]]:
    """The YAML stage `kind: recipe`: `sweep(recipe, run, out, seeds=seeds, **options)`; without
    `seeds`, the one training seed (the experiment's `train: {seed: ...}`, else 0)."""
    seed = options.pop("seed", 0)
    return sweep(recipe, run, out, seeds=[seed] if seeds is None else seeds, data=data, resume=resume,
                 overwrite=overwrite, **options)


def _yaml_keys() -> tuple[str, ...]:
    """A recipe stage's keys: every recipe's own options (each recipe refuses the ones it does not take)."""
    own = dict.fromkeys(k for name in RECIPES.names() for k in _own_options(name)
                        if k not in ("data", "resume"))
    return ("source", "recipe", "seeds", *own, *TRAIN_KEYS)


def _check_stage(options: dict[str, Any], train: dict[str, Any]) -> None:
    name = str(options.get("recipe"))
    if "recipe" not in options:
        raise KdqError(f"a recipe stage needs a recipe: one of {', '.join(RECIPES.names())}")
    own = {k: v for k, v in options.items() if k not in ("source", "recipe", "seeds")}
    check_recipe(name, {**own, **{k: v for k, v in train.items() if k != "seed"}})


def _collect(stage: Any, rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """A recipe stage's rows in the experiment's table, one per (scheme, seed), and for its sweep report."""
    rows = [{**r, "recipe": stage.name} for r in rows]  # rows by stage: two stages may run one recipe differently
    several = len(stage.options.get("seeds", [0])) > 1
    results = {f"{stage.name}/{r['bits']}" + (f" seed{r['seed']}" if several else ""):
               {**read_results(r["run"]), "arch": f"{stage.model} {r['bits']}"} for r in rows}
    return results, rows


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="individual, apprentice, takd-chain, qkd or speq (qkd's phases: use a YAML recipe stage)")
    parser.add_argument("run", help="run directory of the float model every scheme starts from")
    parser.add_argument("--bits", required=True, help="schemes, comma-separated, e.g. w16a16,w8a8,w4a4,w2a2,w1a2 (the chain's order)")
    parser.add_argument("--out", required=True, help="folder to write: <out>/seed<k>/<scheme>/, sweep.md, sweep.png")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, one run of every scheme each (default 0)")
    parser.add_argument("--teacher", help="teacher run directory (apprentice, takd-chain, qkd; default: the source run)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--alpha", type=float)
    method_arguments(parser, "--distill-method")
    parser.add_argument("--quantizer", help="lsq (default), uniform, dorefa, pact, binary or ternary")
    parser.add_argument("--act-quantizer")
    parser.add_argument("--first-last-bits", type=int, help="bits of the first and last layers (default 8; 32 keeps them float)")
    parser.add_argument("--teacher-bits", help="speq: activation widths the teacher pass draws from, comma-separated (32: float)")
    parser.add_argument("--cosine-weight", type=float, help="speq: weight of the cosine distillation term (default 1)")
    parser.add_argument("--resume", action="store_true", help="keep finished schemes and resume interrupted ones")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs already in --out (removed first)")
    add_train_options(parser, FINE_TUNE_DEFAULTS, {"epochs": f"qkd: {QKD_PHASE_EPOCHS} per phase"})


def _cli(args: argparse.Namespace) -> None:
    given = {"teacher": args.teacher, "temperature": args.temperature, "alpha": args.alpha, "quantizer": args.quantizer,
             "act_quantizer": args.act_quantizer, "cosine_weight": args.cosine_weight,
             "teacher_bits": int_list(args.teacher_bits, "--teacher-bits") if args.teacher_bits else None,
             "distill_method": method_spec(args.method, args.method_option)}
    # only what was typed: each recipe takes its own options and rejects the others by name
    options = {k: v for k, v in given.items() if v is not None}
    if args.first_last_bits is not None:
        options["first_last_bits"] = first_last_bits(args.first_last_bits)
    rows = sweep(args.recipe, args.run, args.out, seeds=int_list(args.seeds, "--seeds"), bits=args.bits.split(","),
                 resume=args.resume, overwrite=args.overwrite, **options, **train_options(args))
    if not distributed.is_primary():  # under torchrun rank 0 writes the report
        return
    print(write_report(rows, args.out, read_results(args.run).get("accuracy"), f"{args.recipe}: accuracy against bit width",
                       str(args.run)), end="")
    print(f"wrote {args.out}/ (seed<k>/<scheme>/ run directories, sweep.md, sweep.png)", file=sys.stderr)


STAGES.register(StageKind(
    "recipe", recipe, "low-bit recipes: a float run made into several precisions, with a sweep report",
    writes="recipe", check=_check_stage, keys=_yaml_keys, collect=_collect,
    inherit=RUN_CONTROL_KEYS,  # seed: the default of seeds
    add_arguments=_arguments, run_cli=_cli, arch=lambda model, options: model, distributed=True,
))
