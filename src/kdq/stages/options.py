"""Command-line options the stages share: training options, data options, printing results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

from kdq.engine.config import TRAIN_KEYS, TrainConfig
from kdq.errors import KdqError, short_repr
from kdq.io import parse_yaml

_TRAIN_HELP = {
    "epochs": "training epochs",
    "batch_size": "batch size",
    "optimizer": "sgd (Nesterov momentum) or adamw",
    "lr": "peak learning rate",
    "schedule": "cosine, onecycle or constant",
    "warmup_epochs": "linear warm-up length in epochs",
    "patience": "stop after this many epochs without a better validation accuracy",
    "keep_epoch": "keep the weights after this epoch as epoch-N.safetensors (0: the initial ones), "
                  "for `kdq prune --rewind weights --rewind-epoch N`",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "seed": "seed of the initial weights, shuffling and augmentation: same seed, same weights (0 to 2**32-1)",
    "deterministic": "deterministic CUDA kernels too (slower); the CPU needs no flag",
    "amp": "mixed precision on CUDA",
    "augment": "random crop/flip where the data set allows it",
    "progress": "a per-batch progress bar on a terminal",
    "log": "none, or tensorboard: event files in <out>/tensorboard (needs pip install 'kdq[tensorboard]')",
    "log_every": "with --log: also the batch loss every N steps",
}


def add_train_options(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                      notes: dict[str, str] | None = None) -> None:
    """One flag per TrainConfig field, defaulting to None so only what the user typed is passed on.

    `defaults` are the command's own defaults where they differ from TrainConfig's (the same dict
    the command applies), so --help shows what a run really uses; `notes` add to a flag's help.
    """
    group = parser.add_argument_group("training options")
    defaults, notes = defaults or {}, notes or {}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        note = f"; {notes[f.name]}" if f.name in notes else ""
        help_text = _TRAIN_HELP.get(f.name, f.name.replace("_", " ")) + f" (default: {default}{note})"
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int}.get(f.type, str)
            group.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training options the user typed."""
    return {n: getattr(args, n) for n in TRAIN_KEYS if getattr(args, n, None) is not None}


def add_data_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("data options")
    group.add_argument("--data", required=required, help="data set name (see `kdq datasets`)")
    group.add_argument("--data-dir", help="folder holding the data set's files")
    group.add_argument("--val-size", type=float, help="validation samples (count, or fraction < 1) carved from train")
    group.add_argument("--subset", type=int, help="use only this many training and test samples (quick runs)")
    group.add_argument("--split-seed", type=int, dest="split_seed", help="seed of the validation split")
    group.add_argument("--no-download", action="store_true", help="never download missing files")
    group.add_argument("--data-arg", action="append", default=[], metavar="NAME=VALUE",
                       help="an option of the data set itself, e.g. samples=1000 features=20 classes=3 (synthetic)")


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    val = args.val_size
    if val is not None and not (0 < val < 1 or 1 <= val < math.inf):  # nan fails both
        raise KdqError(f"--val-size must be a count >= 1 or a fraction in (0, 1), got {val:g}")
    common = {
        "data_dir": args.data_dir,
        "val_size": int(val) if val is not None and val >= 1 else val,
        "subset": args.subset,
        "seed": args.split_seed,
        "download": False if args.no_download else None,
    }
    own = parse_key_values(getattr(args, "data_arg", None), "--data-arg", "samples=1000")
    for key in own:
        if key in common or key == "name":
            flag = {"name": "data", "seed": "split-seed", "download": "no-download"}.get(key, key.replace("_", "-"))
            raise KdqError(f"--data-arg {key} is not a data set's own option; use --{flag}")
    return {**common, **own}


def add_run_options(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    """--out, --overwrite and (for commands that train) --resume."""
    parser.add_argument("--out", required=True, help="run directory to write")
    if resume:
        parser.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its files are removed first)")


def parse_model_args(items: list[str]) -> dict[str, Any]:
    return parse_key_values(items, "--model-arg", "width=2", "write e.g. hidden=[64,32]")


def parse_key_values(items: list[str] | None, flag: str, example: str, fix: str | None = None) -> dict[str, Any]:
    """Repeated `flag NAME=VALUE` as {name: value}, each value parsed as a YAML scalar or list."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KdqError(f"{flag} {short_repr(item)} must look like NAME=VALUE, e.g. {example}")
        if key.strip() in out:
            raise KdqError(f"{flag} {short_repr(key.strip())} is given twice; give each option once")
        out[key.strip()] = parse_yaml(value, f"{flag} {short_repr(key.strip())}", fix or f"write e.g. {example}")
    return out


def int_list(text: str, what: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise KdqError(f"{what} must be comma-separated integers, e.g. 0,1; got {text!r}") from None


def first_last_bits(value: int | None) -> int | None:
    """--first-last-bits 32 keeps the first and last layers float (None)."""
    return None if value == 32 else value


def print_results(results: dict[str, Any]) -> None:
    keys = ("accuracy", "top5", "params", "size_bytes", "latency_ms_batch1", "latency_ms_batch1_iqr", "throughput_per_s",
            "runtime", "precision", "bits")
    print(json.dumps({k: results[k] for k in keys if k in results}, indent=2))
