"""The `kdq` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

from kdq.engine import distributed
from kdq.engine.config import FINE_TUNE_DEFAULTS, QAT_DEFAULTS, QKD_PHASE_EPOCHS, TrainConfig
from kdq.errors import KdqError, short_repr
from kdq.io import parse_yaml

EXIT_USAGE = 2

_TRAIN_HELP = {
    "epochs": "training epochs",
    "batch_size": "batch size",
    "optimizer": "sgd (Nesterov momentum) or adamw",
    "lr": "peak learning rate",
    "schedule": "cosine, onecycle or constant",
    "warmup_epochs": "linear warm-up length in epochs",
    "patience": "stop after this many epochs without a better validation accuracy",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "seed": "seed of the initial weights, shuffling and augmentation: same seed, same weights (0 to 2**32-1)",
    "deterministic": "deterministic CUDA kernels too (slower); the CPU needs no flag",
    "amp": "mixed precision on CUDA",
    "augment": "random crop/flip where the data set allows it",
}


def _add_train_options(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
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


def _add_data_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("data options")
    group.add_argument("--data", required=required, help="data set name (see `kdq datasets`)")
    group.add_argument("--data-dir", help="folder holding the data set's files")
    group.add_argument("--val-size", type=float, help="validation samples (count, or fraction < 1) carved from train")
    group.add_argument("--subset", type=int, help="use only this many training and test samples (quick runs)")
    group.add_argument("--split-seed", type=int, dest="split_seed", help="seed of the validation split")
    group.add_argument("--no-download", action="store_true", help="never download missing files")


def _parse_model_args(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KdqError(f"--model-arg {short_repr(item)} must look like NAME=VALUE, e.g. width=2")
        if key.strip() in out:
            raise KdqError(f"--model-arg {short_repr(key.strip())} is given twice; give each option once")
        out[key.strip()] = parse_yaml(value, f"--model-arg {short_repr(key.strip())}", "write e.g. hidden=[64,32]")
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with kdq's one-line errors (its own print the whole usage first); subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kdq: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdq", description="Distill, quantize and measure neural networks.")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import this Python module first (repeatable), e.g. one that registers your own "
                             "models with kdq.models.register_model; it must be on PYTHONPATH")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("datasets", help="list the data sets and where their files are")
    models = sub.add_parser("models", help="list the model zoo")
    models.add_argument("pattern", nargs="?", default="*", help="glob, e.g. 'resnet*'")

    for name, help_text in (("train", "train a model with cross-entropy"), ("distill", "distill a teacher into a student")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", required=True, help="zoo model name (see `kdq models`)")
        p.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE", help="model keyword argument")
        p.add_argument("--out", required=True, help="run directory to write")
        p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its files are removed first)")
        if name == "distill":
            p.add_argument("--teacher", required=True, help="the teacher's run directory")
            p.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T (default 4)")
            p.add_argument("--alpha", type=float, default=0.7, help="weight of the soft term (default 0.7)")
            p.add_argument("--teacher-mode", choices=("online", "cached"), default="online",
                           help="run the teacher on every batch, or once over the training set")
        _add_data_options(p)
        _add_train_options(p)

    ev = sub.add_parser("evaluate", help="evaluate a run directory or an exported .onnx file")
    ev.add_argument("run", help="run directory, or a .onnx file (run with ONNX Runtime)")
    ev.add_argument("--split", default="test", choices=("test", "val", "train"))
    ev.add_argument("--no-speed", action="store_true", help="skip latency and throughput measurement")
    _add_data_options(ev, required=False)

    q = sub.add_parser("quantize", help="int8 post-training quantization of a run directory")
    q.add_argument("run", help="run directory of a float model")
    q.add_argument("--out", required=True, help="run directory to write")
    q.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its files are removed first)")
    q.add_argument("--method", choices=("static", "dynamic"), default="static",
                   help="static: int8 weights and activations, calibrated; "
                        "dynamic: int8 Linear, LSTM and GRU weights, activations quantized on the fly")
    q.add_argument("--calibration-batches", type=int, default=32, help="training batches to calibrate on (default 32)")
    q.add_argument("--calibration-batch-size", type=int, default=128)
    q.add_argument("--observer", choices=("minmax", "moving_average", "histogram"), default="histogram")
    q.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True, help="per-channel weight scales")
    q.add_argument("--skip", action="append", default=[], metavar="LAYER", help="leave this module in float")
    q.add_argument("--backend", choices=("x86", "fbgemm", "qnnpack"), default="x86",
                   help="int8 kernels: x86 (default) or qnnpack (ARM)")

    qt = sub.add_parser("qat", help="quantization-aware fine-tuning (optionally with a teacher), then int8")
    qt.add_argument("run", help="run directory of a float model")
    qt.add_argument("--out", required=True, help="run directory to write")
    qt.add_argument("--teacher", help="distill from this run directory while fine-tuning")
    qt.add_argument("--temperature", type=float, default=4.0)
    qt.add_argument("--alpha", type=float, default=0.7)
    qt.add_argument("--backend", choices=("x86", "fbgemm", "qnnpack"), default="x86")
    qt.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True)
    qt.add_argument("--freeze-bn-epoch", type=int, help="stop updating batch-norm statistics from this epoch")
    qt.add_argument("--freeze-observer-epoch", type=int, help="freeze quantization ranges from this epoch")
    qt.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    qt.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its files are removed first)")
    qt.add_argument("--bits", help="low-bit QAT instead of int8: a scheme such as w4a4, w2a2, w1a32 (a32: float activations)")
    qt.add_argument("--quantizer", default="lsq",
                    help="low-bit quantizer: lsq (default), uniform, dorefa, pact (with DoReFa weights), "
                         "binary or ternary (with LSQ activations)")
    qt.add_argument("--act-quantizer", help="low-bit activation quantizer, when it differs from --quantizer's")
    qt.add_argument("--first-last-bits", type=int, default=8,
                    help="bits of the first and last layers in low-bit QAT (default 8; 32 keeps them float)")
    lowbit_differs = {k: v for k, v in FINE_TUNE_DEFAULTS.items() if QAT_DEFAULTS.get(k) != v}
    _add_train_options(qt, {**QAT_DEFAULTS, "amp": False},
                       {"amp": "int8 QAT always trains in fp32; with --bits: True",
                        **{k: f"with --bits: {v}" for k, v in lowbit_differs.items()}})

    rc = sub.add_parser("recipe", help="low-bit recipes: a float run made into several precisions, with a sweep report")
    rc.add_argument("recipe", help="individual, apprentice, takd-chain, qkd or speq (qkd's phases: use a YAML recipe stage)")
    rc.add_argument("run", help="run directory of the float model every scheme starts from")
    rc.add_argument("--bits", required=True, help="schemes, comma-separated, e.g. w16a16,w8a8,w4a4,w2a2,w1a2 (the chain's order)")
    rc.add_argument("--out", required=True, help="folder to write: <out>/seed<k>/<scheme>/, sweep.md, sweep.png")
    rc.add_argument("--seeds", default="0", help="comma-separated seeds, one run of every scheme each (default 0)")
    rc.add_argument("--teacher", help="teacher run directory (apprentice, takd-chain, qkd; default: the source run)")
    rc.add_argument("--temperature", type=float)
    rc.add_argument("--alpha", type=float)
    rc.add_argument("--quantizer", help="lsq (default), uniform, dorefa, pact, binary or ternary")
    rc.add_argument("--act-quantizer")
    rc.add_argument("--first-last-bits", type=int, help="bits of the first and last layers (default 8; 32 keeps them float)")
    rc.add_argument("--teacher-bits", help="speq: activation widths the teacher pass draws from, comma-separated (32: float)")
    rc.add_argument("--cosine-weight", type=float, help="speq: weight of the cosine distillation term (default 1)")
    rc.add_argument("--resume", action="store_true", help="keep finished schemes and resume interrupted ones")
    rc.add_argument("--overwrite", action="store_true", help="replace the runs already in --out (removed first)")
    _add_train_options(rc, FINE_TUNE_DEFAULTS, {"epochs": f"qkd: {QKD_PHASE_EPOCHS} per phase"})

    ex = sub.add_parser("export", help="export a run directory's model for deployment")
    ex.add_argument("run", help="run directory (float, or int8 from quantize/qat: exported with its own scales)")
    ex.add_argument("--format", choices=("onnx", "packed"), default="onnx",
                    help="onnx, or packed: a low-bit run's weights at their real bit width in one safetensors file")
    ex.add_argument("--out", required=True, help="file to write, e.g. runs/kd/model.onnx")
    ex.add_argument("--int8", action="store_true",
                    help="int8 QDQ with per-channel weights: calibrated by ONNX Runtime for a float run, "
                         "carried over for an int8 run (which is exported as int8 either way)")
    ex.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8",
                    help="ONNX Runtime calibration only: uint8 activations (U8S8, fastest on AVX2 CPUs) or int8 (S8S8)")
    ex.add_argument("--calibration-batches", type=int, default=32, help="training batches used to calibrate (default 32)")
    ex.add_argument("--calibration-batch-size", type=int, default=128)
    ex.add_argument("--calibrate-method", choices=("minmax", "entropy", "percentile"), default="minmax")

    run = sub.add_parser("run", help="run a multi-stage YAML experiment")
    run.add_argument("experiment", help="YAML file, e.g. examples/quickstart.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a value: a stage's (teacher.epochs=2) or a section's (data.subset=1000)")
    run.add_argument("--out", help="output folder (default: the file's `out`, else runs/<name>)")
    return parser


def _data_options(args: argparse.Namespace) -> dict[str, Any]:
    val = args.val_size
    if val is not None and not (0 < val < 1 or 1 <= val < math.inf):  # nan fails both
        raise KdqError(f"--val-size must be a count >= 1 or a fraction in (0, 1), got {val:g}")
    return {
        "data_dir": args.data_dir,
        "val_size": int(val) if val is not None and val >= 1 else val,
        "subset": args.subset,
        "seed": args.split_seed,
        "download": False if args.no_download else None,
    }


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "extra"]
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _print_results(results: dict[str, Any]) -> None:
    keys = ("accuracy", "top5", "params", "size_bytes", "latency_ms_batch1", "latency_ms_batch1_iqr", "throughput_per_s",
            "runtime", "precision", "bits")
    print(json.dumps({k: results[k] for k in keys if k in results}, indent=2))


def _cmd_datasets(args: argparse.Namespace) -> None:
    from kdq.data import list_datasets
    from kdq.report.table import markdown_table

    rows = [{**d, "input_shape": "x".join(map(str, d["input_shape"]))} for d in list_datasets()]
    cols = (("name", "name"), ("input_shape", "input"), ("num_classes", "classes"), ("location", "files"))
    print(markdown_table(rows, cols))


def _cmd_models(args: argparse.Namespace) -> None:
    from kdq.models import create_model, list_models, model_info
    from kdq.report.table import markdown_table

    rows = []
    for name in list_models(args.pattern):
        entry = model_info(name)
        in_ch = 3 if entry.input_kind == "image" else 20
        params = sum(p.numel() for p in create_model(name, 10, in_ch).parameters())
        rows.append({"name": name, "input": entry.input_kind, "params": f"{params:,}", "about": entry.description})
    if not rows:
        raise KdqError(f"no model matches {args.pattern!r}; run `kdq models` to see them all")
    print(markdown_table(rows, (("name", "name"), ("input", "input"), ("params", "params (10 classes)"), ("about", "description"))))


def _cmd_train(args: argparse.Namespace) -> None:
    from kdq import api

    common = dict(out=args.out, resume=args.resume, overwrite=args.overwrite, model_kwargs=_parse_model_args(args.model_arg),
                  data_options=_data_options(args), **_train_options(args))
    if args.command == "train":
        run = api.train(args.model, args.data, **common)
    else:
        run = api.distill(args.model, args.teacher, args.data, temperature=args.temperature, alpha=args.alpha,
                          teacher_mode=args.teacher_mode, **common)
    if not distributed.is_primary():  # under torchrun rank 0 reports for all
        return
    _print_results(run.results)
    print(f"wrote {Path(args.out)}/ (model.safetensors, model.json, results.json, metrics.jsonl)", file=sys.stderr)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from kdq import api
    from kdq.rundir import eval_file

    data = None
    if args.data is not None:
        data, _ = api.resolve_data(args.data, **_data_options(args))
    if args.run.endswith(".onnx"):
        results = api.evaluate_onnx_file(args.run, data, speed=not args.no_speed)
        _print_results(results)
        print(f"wrote {Path(args.run).with_suffix('')}.results.json and .confusion_matrix.png", file=sys.stderr)
        return
    results = api.evaluate(args.run, data, split=args.split, speed=not args.no_speed)
    _print_results(results)
    # the run's own results.json stays as the command that made it wrote it
    written = Path(args.run) / eval_file(args.split, None if data is None else data.name)
    print(f"wrote {written} and {written.with_suffix('.png').name}", file=sys.stderr)


def _cmd_quantize(args: argparse.Namespace) -> None:
    from kdq.quantize_api import quantize

    results = quantize(args.run, args.out, method=args.method, calibration_batches=args.calibration_batches,
                       batch_size=args.calibration_batch_size, backend=args.backend, observer=args.observer,
                       per_channel=args.per_channel, skip=args.skip, overwrite=args.overwrite)
    _print_results(results)
    print(f"wrote {args.out}/ (quantized.safetensors, quantized.json, results.json)", file=sys.stderr)


def _cmd_qat(args: argparse.Namespace) -> None:
    common = dict(teacher=args.teacher, temperature=args.temperature, alpha=args.alpha, resume=args.resume,
                  overwrite=args.overwrite,
                  **_train_options(args))
    if args.bits:
        from kdq.lowbit_api import lowbit_qat

        results = lowbit_qat(args.run, args.out, bits=args.bits, quantizer=args.quantizer,
                             act_quantizer=args.act_quantizer,
                             first_last_bits=None if args.first_last_bits == 32 else args.first_last_bits, **common)
        written = "packed.safetensors, packed.json"
    else:
        from kdq.quantize_api import qat

        results = qat(args.run, args.out, backend=args.backend, per_channel=args.per_channel,
                      freeze_bn_epoch=args.freeze_bn_epoch, freeze_observer_epoch=args.freeze_observer_epoch, **common)
        written = "quantized.safetensors, quantized.json"
    _print_results(results)
    print(f"wrote {args.out}/ ({written}, results.json)", file=sys.stderr)


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise KdqError(f"{what} must be comma-separated integers, e.g. 0,1; got {text!r}") from None


def _cmd_recipe(args: argparse.Namespace) -> None:
    from kdq.recipes import sweep, write_report
    from kdq.rundir import read_results

    given = {"teacher": args.teacher, "temperature": args.temperature, "alpha": args.alpha, "quantizer": args.quantizer,
             "act_quantizer": args.act_quantizer, "cosine_weight": args.cosine_weight,
             "teacher_bits": _int_list(args.teacher_bits, "--teacher-bits") if args.teacher_bits else None}
    # only what was typed: each recipe takes its own options and rejects the others by name
    options = {k: v for k, v in given.items() if v is not None}
    if args.first_last_bits is not None:
        options["first_last_bits"] = None if args.first_last_bits == 32 else args.first_last_bits
    rows = sweep(args.recipe, args.run, args.out, seeds=_int_list(args.seeds, "--seeds"), bits=args.bits.split(","),
                 resume=args.resume, overwrite=args.overwrite, **options, **_train_options(args))
    print(write_report(rows, args.out, read_results(args.run).get("accuracy"), f"{args.recipe}: accuracy against bit width",
                       str(args.run)), end="")
    print(f"wrote {args.out}/ (seed<k>/<scheme>/ run directories, sweep.md, sweep.png)", file=sys.stderr)


def _cmd_export(args: argparse.Namespace) -> None:
    from kdq import api

    info = api.export(args.run, args.out, int8=args.int8, calibration_batches=args.calibration_batches,
                      batch_size=args.calibration_batch_size, calibrate_method=args.calibrate_method,
                      activation_type=args.activation_type, format=args.format)
    print(json.dumps(info, indent=2))


def _cmd_run(args: argparse.Namespace) -> None:
    from kdq.config import load_experiment
    from kdq.experiment import run_experiment

    run_experiment(load_experiment(args.experiment, args.set), args.out)


COMMANDS = {
    "datasets": _cmd_datasets,
    "models": _cmd_models,
    "train": _cmd_train,
    "distill": _cmd_train,
    "evaluate": _cmd_evaluate,
    "export": _cmd_export,
    "quantize": _cmd_quantize,
    "qat": _cmd_qat,
    "recipe": _cmd_recipe,
    "run": _cmd_run,
}


def import_user_modules(names: list[str]) -> None:
    """Import the modules the user named with --import (their code registers models).

    Only names typed on the command line are imported, never one read from a file.
    """
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise KdqError(f"--import {name}: {exc}; put the module's folder on PYTHONPATH "
                           f"(e.g. PYTHONPATH=. kdq --import {name} ...) or install its package") from None
        except KdqError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's own code may raise anything on import
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise KdqError(f"--import {name}: importing it failed ({type(exc).__name__}: {first}); fix that module") from None


# The commands that train data-parallel under torchrun; the others (QAT, recipes, experiments)
# would have every rank write the same run directory, so they are refused there for now.
DISTRIBUTED_COMMANDS = ("train", "distill")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import_user_modules(args.imports)
        if getattr(args, "resume", False) and getattr(args, "overwrite", False):
            raise KdqError("--resume continues the run in --out and --overwrite replaces it; give one of them")
        if distributed.active() and args.command not in DISTRIBUTED_COMMANDS:
            raise KdqError(f"kdq {args.command} runs as one process; under torchrun only "
                           f"{' and '.join(DISTRIBUTED_COMMANDS)} are data-parallel")
        COMMANDS[args.command](args)
    except KdqError as exc:
        print(f"kdq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # what the readers and atomic_write did not already name: the file and the reason
        where = f" {exc.filename}" if exc.filename else ""
        print(f"kdq: error: cannot access{where}: {exc.strerror or exc}; free space, fix permissions or choose "
              "another --out", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("kdq: error: out of memory; use a smaller --batch-size, --subset or model", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kdq: interrupted; rerun the same command with --resume (kdq run resumes by itself)", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()  # under torchrun: leave the process group (a no-op otherwise)
    return 0


if __name__ == "__main__":
    sys.exit(main())
