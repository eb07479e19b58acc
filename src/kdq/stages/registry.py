"""The stage registry: a stage kind is its entry point plus how YAML and the CLI reach it (see kdq.stages)."""

from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdq.engine.config import TRAIN_KEYS
from kdq.errors import KdqError, suggest

# Supplied by the experiment (or the CLI), never written in a YAML stage.
INJECTED = ("data", "out", "resume", "overwrite", "data_options")
# An entry point's parameter -> its YAML key.
YAML_NAMES = {"run": "source", "student": "model", "model_kwargs": "model_args"}


@dataclass(frozen=True)
class StageKind:
    """A registered stage: see the module's docstring."""

    name: str
    entry: Callable[..., Any]
    help: str
    writes: str | Callable[[dict[str, Any]], str]  # the kind of run directory (kdq.rundir.layout.KINDS)
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run_cli: Callable[[argparse.Namespace], None] | None = None
    check: Callable[[dict[str, Any], dict[str, Any]], None] | None = None  # (options, train) before any work
    inherit: tuple[str, ...] | None = None  # the `train:` defaults it takes (None: all of them)
    train_defaults: dict[str, Any] = field(default_factory=dict)  # its own training defaults (fine-tuning)
    keys: Callable[[], tuple[str, ...]] | None = None  # its YAML keys, when not its signature's
    arch: Callable[[str, dict[str, Any]], str] | None = None  # the summary table's cell for (model, options)
    # several runs in one stage (a recipe, mutual learning): (stage, returned) -> ({row: results}, sweep rows)
    collect: Callable[[Any, Any], tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]] | None = None
    yaml: bool = True  # a YAML kind (some verbs, like evaluate, only read runs)
    takes: tuple[str, ...] = ("float",)  # the kinds of run its YAML `source` may name
    distributed: bool = False  # may run data-parallel under torchrun

    def run_kind(self, options: dict[str, Any]) -> str:
        return self.writes(options) if callable(self.writes) else self.writes

    def parameters(self) -> dict[str, inspect.Parameter]:
        return dict(inspect.signature(self.entry).parameters)

    def source_param(self) -> str | None:
        """The entry's first parameter when it takes a run ("run") or a model ("model", "student")."""
        first = next(iter(self.parameters()), None)
        return first if first in ("run", "model", "student") else None

    def takes_training(self) -> bool:
        return any(p.kind is p.VAR_KEYWORD for p in self.parameters().values())

    def yaml_keys(self) -> tuple[str, ...]:
        """The keys a YAML stage of this kind may hold (besides `kind`)."""
        if self.keys is not None:
            return self.keys()
        own = [YAML_NAMES.get(n, n) for n, p in self.parameters().items()
               if n not in INJECTED and p.kind is not p.VAR_KEYWORD]
        return tuple(own) + (TRAIN_KEYS if self.takes_training() else ())

    def call(self, options: dict[str, Any], train: dict[str, Any], **injected: Any) -> Any:
        """Call the entry point with YAML-named `options`, training options and what is injected."""
        params = self.parameters()
        by_yaml = {YAML_NAMES.get(n, n): n for n in params}
        kwargs = {by_yaml.get(k, k): v for k, v in options.items()}  # the rest go to its **options
        kwargs.update({k: v for k, v in injected.items() if k in params})
        return self.entry(**kwargs, **train)


class StageRegistry:
    def __init__(self) -> None:
        self._kinds: dict[str, StageKind] = {}

    def register(self, kind: StageKind) -> StageKind:
        if kind.name in self._kinds:
            raise ValueError(f"stage kind {kind.name!r} registered twice")
        self._kinds[kind.name] = kind
        return kind

    def unregister(self, name: str) -> None:
        self._kinds.pop(name, None)

    def get(self, name: str) -> StageKind:
        if name not in self._kinds:
            raise KdqError(f"unknown stage kind {name!r}{suggest(str(name), self.yaml_kinds())}; "
                           f"kinds: {', '.join(self.yaml_kinds())}")
        return self._kinds[name]

    def __iter__(self):  # noqa: ANN204
        return iter(self._kinds.values())

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def yaml_kinds(self) -> list[str]:
        return [k.name for k in self._kinds.values() if k.yaml]


STAGES = StageRegistry()


def signature_arguments(kind: StageKind) -> Callable[[argparse.ArgumentParser], None]:
    """CLI arguments derived from the entry's signature: positional parameters become positional
    arguments, `out` and keyword parameters --flags typed like their defaults (for stages that
    give none)."""

    def add(parser: argparse.ArgumentParser) -> None:
        for name, p in kind.parameters().items():
            if p.kind is p.VAR_KEYWORD or name in ("data", "data_options"):
                continue
            flag = "--" + name.replace("_", "-")
            if name == "out":  # every kdq verb writes to --out
                parser.add_argument(flag, required=p.default is p.empty, help="run directory to write")
            elif p.default is p.empty:
                parser.add_argument(name) if p.kind is not p.KEYWORD_ONLY else parser.add_argument(flag, required=True)
            elif isinstance(p.default, bool):
                parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=p.default)
            else:
                typed = type(p.default) if isinstance(p.default, (int, float, str)) else str
                parser.add_argument(flag, dest=name, type=typed, default=p.default)

    return add


def signature_cli(kind: StageKind) -> Callable[[argparse.Namespace], None]:
    """Call the entry with the parsed arguments and print what it returns."""

    def run(args: argparse.Namespace) -> None:
        values = {n: getattr(args, n) for n in kind.parameters() if hasattr(args, n)}
        print(json.dumps(kind.entry(**values), indent=2, default=str))

    return run
