"""The `kdq` command line: one verb per registered stage (kdq.stages), plus listing and `kdq run`."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from kdq import recipes  # noqa: F401 - registers the recipe stage
from kdq.engine import distributed
from kdq.errors import KdqError
from kdq.stages import STAGES, signature_arguments, signature_cli

EXIT_USAGE = 2


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
    sub.add_parser("methods", help="list the distillation methods: family, what they read, defaults")
    for kind in STAGES:
        (kind.add_arguments or signature_arguments(kind))(sub.add_parser(kind.name, help=kind.help))
    run = sub.add_parser("run", help="run a multi-stage YAML experiment")
    run.add_argument("experiment", help="YAML file, e.g. examples/quickstart.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a value: a stage's (teacher.epochs=2) or a section's (data.subset=1000)")
    run.add_argument("--out", help="output folder (default: the file's `out`, else runs/<name>)")
    runs_help = "run directories, experiment folders, or folders searched for runs (seeds of one model are grouped)"
    report = sub.add_parser("report", help="compare runs on one page: report.html (self-contained) and report.md")
    report.add_argument("runs", nargs="*", metavar="RUN_OR_EXPERIMENT", help=runs_help)
    report.add_argument("--out", required=True, help="folder to write report.html, report.md and its figures into")
    report.add_argument("--reference", metavar="LABEL",
                        help="the row every ratio is taken against "
                             "(default: the experiment's teacher, else the first row)")
    report.add_argument("--models", metavar="A,B",
                        help="rows shown in detail: per-class accuracy, confusion matrices, training curves "
                             "(default: the reference and the most accurate other)")
    report.add_argument("--title", help="the page's title (default: what was compared, on which data)")
    compare = sub.add_parser("compare", help="print the comparison table of runs (the summary of `kdq report`)")
    compare.add_argument("runs", nargs="*", metavar="RUN", help=runs_help)
    compare.add_argument("--reference", metavar="LABEL", help="the row every ratio is taken against")
    compare.add_argument("--markdown", action="store_true", help="print a Markdown table instead of plain text")
    return parser


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


def _cmd_methods(args: argparse.Namespace) -> None:
    import inspect

    from kdq.distill import LOSSES
    from kdq.report.table import markdown_table

    rows = []
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        options = [f"{p.name}={p.default!r}" for p in inspect.signature(cls).parameters.values()
                   if p.default is not p.empty]
        rows.append({"name": name, "family": cls.family, "reads": cls.reads, "weight": f"{cls.default_weight:g}",
                     "ce": "in loss" if cls.includes_ce else "added", "options": ", ".join(options) or "-",
                     "paper": cls.paper})
    print(markdown_table(rows, (("name", "method"), ("family", "family"), ("reads", "reads"),
                                ("weight", "default weight"), ("ce", "cross-entropy"), ("options", "options (defaults)"),
                                ("paper", "paper"))))


def _cmd_run(args: argparse.Namespace) -> None:
    from kdq.config import load_experiment
    from kdq.experiment import run_experiment

    run_experiment(load_experiment(args.experiment, args.set), args.out)


def _cmd_report(args: argparse.Namespace) -> None:
    from kdq.report.compare import collect, summary_table
    from kdq.report.page import write_report

    models = None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
    rows = collect(args.runs)
    files = write_report(rows, args.out, title=args.title, reference=args.reference, models=models)
    print(summary_table(rows, args.reference, markdown=False), end="")
    print(f"wrote {files.html} and {files.markdown} ({len(files.figures)} figures beside it)", file=sys.stderr)


def _cmd_compare(args: argparse.Namespace) -> None:
    from kdq.report.compare import compare

    print(compare(args.runs, args.reference, markdown=args.markdown), end="")


COMMANDS = {"datasets": _cmd_datasets, "models": _cmd_models, "methods": _cmd_methods, "run": _cmd_run,
            "report": _cmd_report, "compare": _cmd_compare}


def _command(name: str):  # noqa: ANN202
    if name in COMMANDS:
        return COMMANDS[name]
    kind = STAGES.get(name)
    return kind.run_cli or signature_cli(kind)


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import_user_modules(args.imports)
        if getattr(args, "resume", False) and getattr(args, "overwrite", False):
            raise KdqError("--resume continues the run in --out and --overwrite replaces it; give one of them")
        if distributed.active() and not (args.command in STAGES and STAGES.get(args.command).distributed):
            parallel = [k.name for k in STAGES if k.distributed]
            raise KdqError(f"kdq {args.command} runs as one process; under torchrun only "
                           f"{', '.join(parallel[:-1])} and {parallel[-1]} are data-parallel")
        _command(args.command)(args)
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
