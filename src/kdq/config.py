"""YAML experiments: plain data, validated against typed schemas before any work starts.

    name: quickstart
    data: {name: fashion-mnist, subset: 20000}
    train: {batch_size: 128}              # defaults for every stage
    stages:
      teacher:  {kind: train, model: resnet20, epochs: 4}
      baseline: {kind: train, model: cnn-small, epochs: 4}
      kd:       {kind: distill, model: cnn-small, teacher: teacher, temperature: 4, alpha: 0.7}
    compare: {baseline: baseline, student: kd}

A stage's `kind` is a registered stage (kdq.stages.STAGES) and its keys follow that stage's
entry point's signature; the values of the keys every kind shares are checked here by name
(STAGE_RULES), the rest by the stage's own check, all before any stage runs.

Overrides `KEY.PATH=VALUE` address a stage by its name first (`teacher.epochs=2`), else a
top-level section (`data.subset=1000`, `train.lr=0.1`); values are parsed as YAML scalars.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdq import recipes  # noqa: F401 - registers the recipe stage
from kdq.distill import TEACHER_MODES
from kdq.engine.config import SEED_MAX, TRAIN_KEYS, TrainConfig
from kdq.errors import KdqError, short_repr, suggest
from kdq.io import parse_yaml, read_yaml
from kdq.rundir.layout import RUN_FILES, check_name
from kdq.rundir.load import saved_meta, shape_text
from kdq.stages import STAGES, StageKind

TOP_LEVEL = ("name", "out", "data", "train", "stages", "compare")
_SOURCE_KEYS = ("samples", "features", "classes")  # data keys the data set itself checks (Source.configure)
DATA_KEYS = ("name", "data_dir", "val_size", "subset", "seed", "download", *_SOURCE_KEYS)
QUANT_CHOICES = {
    "method": ("static", "dynamic"),
    "backend": ("x86", "fbgemm", "qnnpack"),
    "observer": ("minmax", "moving_average", "histogram"),
}


# ---- what each value may be: (what to write, test), checked for every key and every stage before
# any work starts. Training keys are TrainConfig's to check; model options are the model's.
Rule = tuple[str, Callable[[Any], bool]]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite int or float: YAML's .inf and .nan are refused where a number is meant."""
    return (_is_int(v) and abs(v) <= 1e308) or (isinstance(v, float) and math.isfinite(v))  # the int as a float


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _is_seed(v: Any) -> bool:
    return _is_int(v) and 0 <= v <= SEED_MAX


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(_is_str(x) for x in v)


def _choice(choices: tuple[str, ...]) -> Rule:
    return f"one of {', '.join(choices)}", lambda v: isinstance(v, str) and v in choices


_SEEDS = f"integers from 0 to {SEED_MAX}"  # as TrainConfig's seed
DATA_RULES: dict[str, Rule] = {
    "name": ("a data set name (see `kdq datasets`)", _is_str),
    "data_dir": ("a folder path", lambda v: v is None or _is_str(v)),
    "subset": ("a positive integer (samples per split), or null for all", lambda v: v is None or (_is_int(v) and v >= 1)),
    "val_size": ("a positive integer or a fraction in (0, 1)",
                 lambda v: (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v < 1)),
    "seed": (f"one of the {_SEEDS}", _is_seed),
    "download": ("true or false", lambda v: isinstance(v, bool)),
}
STAGE_RULES: dict[str, Rule] = {
    "model": ("a model name (see `kdq models`)", _is_str),
    "model_args": ("a mapping of model options, e.g. {width: 16}", lambda v: v is None or isinstance(v, dict)),
    "teacher": ("an earlier stage's name or a run directory, or a list of them",
                lambda v: _is_str(v) or (isinstance(v, list) and len(v) > 0 and _strings(v))),
    "labeled": ("an integer >= 1 (training images that keep their labels), or null",
                lambda v: v is None or (_is_int(v) and v >= 1)),
    "temperature": ("> 0 and finite", lambda v: _is_number(v) and v > 0),
    "alpha": ("in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "teacher_mode": _choice(TEACHER_MODES),
    "source": ("an earlier stage's name", _is_str),
    **{key: _choice(choices) for key, choices in QUANT_CHOICES.items() if key != "method"},  # method: per kind
    "calibration_batches": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "per_channel": ("true or false", lambda v: isinstance(v, bool)),
    "skip": ("a list of layer names, e.g. [fc]", _strings),
    "freeze_bn_epoch": ("an integer >= 0, or null", lambda v: v is None or (_is_int(v) and v >= 0)),
    "freeze_observer_epoch": ("an integer >= 0, or null", lambda v: v is None or (_is_int(v) and v >= 0)),
    "bits": ("a scheme such as w4a4 (a recipe stage also takes a list of them)",
             lambda v: _is_str(v) or (isinstance(v, list) and len(v) > 0 and _strings(v))),
    "quantizer": ("a quantizer name such as lsq", _is_str),
    "act_quantizer": ("a quantizer name such as lsq, or null", lambda v: v is None or _is_str(v)),
    "first_last_bits": ("an integer from 1 to 16, or null", lambda v: v is None or (_is_int(v) and 1 <= v <= 16)),
    "recipe": ("a recipe name", _is_str),
    "seeds": (f"a list of different {_SEEDS}, e.g. [0, 1, 2]",
              lambda v: isinstance(v, list) and len(v) > 0 and all(_is_seed(x) for x in v) and len(set(v)) == len(v)),
    "phases": ("a mapping of phase names to training options", lambda v: v is None or isinstance(v, dict)),
    "teacher_bits": ("a list of activation widths, e.g. [2, 4, 8, 32]",
                     lambda v: v is None or (isinstance(v, list) and all(_is_int(x) for x in v))),
    "cosine_weight": (">= 0 and finite", lambda v: _is_number(v) and v >= 0),
}


def _check_values(values: dict[str, Any], rules: dict[str, Rule], where: str) -> None:
    """Refuse the first value its rule does not accept, in one line naming the key."""
    for key, value in values.items():
        if key in rules:
            what, ok = rules[key]
            if not ok(value):
                raise KdqError(f"{where}: {key} must be {what}, got {short_repr(value)}")


@dataclass
class Stage:
    name: str
    kind: str  # a registered stage (kdq.stages.STAGES)
    model: str  # the model it trains, or the one its source stage trained (the summary's architecture)
    options: dict[str, Any] = field(default_factory=dict)  # its YAML keys but training options, checked
    train: dict[str, Any] = field(default_factory=dict)  # training options: inherited defaults + its own

    @property
    def source(self) -> str | None:
        """The earlier stage whose model it starts from (quantize, qat, recipe)."""
        return self.options.get("source")

    @property
    def teacher(self) -> str | list[str] | None:
        """An earlier stage's name, or a run directory (or a list of them: an ensemble)."""
        return self.options.get("teacher")


@dataclass
class Experiment:
    name: str
    data: dict[str, Any]
    stages: list[Stage]
    compare: dict[str, str]
    out: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read, override and validate an experiment file; every problem is one KdqError line."""
    path = Path(path)
    if not path.is_file():
        raise KdqError(f"experiment file {str(path)!r} not found; see examples/quickstart.yaml for the format")
    # size, UTF-8, nesting depth and alias expansion are all capped before any value is built
    raw = read_yaml(path, fix="see examples/quickstart.yaml for the format")
    if not isinstance(raw, dict):
        raise KdqError(f"{path} must be a YAML mapping with keys {', '.join(TOP_LEVEL)}")
    for item in overrides:
        apply_override(raw, item)
    return parse_experiment(raw, default_name=path.stem)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override in place."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise KdqError(f"override {item!r} must look like KEY=VALUE, e.g. teacher.epochs=2")
    try:  # the same capped loader as experiment files: a typed value is YAML too
        value = parse_yaml(text, f"--set {short_repr(key)}") if text else None
    except KdqError:
        value = text  # not YAML: taken as the string typed
    parts = key.split(".")
    stages = raw.get("stages") or {}
    if parts[0] in stages and parts[0] not in TOP_LEVEL:
        parts = ["stages", *parts]
    elif parts[0] not in TOP_LEVEL:
        choices = list(TOP_LEVEL) + list(stages)
        raise KdqError(f"override {key!r}: {parts[0]!r} is neither a stage nor a section{suggest(parts[0], choices)}")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KdqError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise KdqError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(values: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in values:
        if key not in allowed:
            raise KdqError(f"unknown key {short_repr(key)} in {where}{suggest(str(key), allowed)}; allowed: {', '.join(allowed)}")


def parse_experiment(raw: dict[str, Any], default_name: str = "experiment") -> Experiment:
    _check_keys(raw, TOP_LEVEL, "the experiment")
    # the experiment's and its stages' names become folders (runs/<name>/<stage>): plain names only
    check_name(raw.get("name", default_name),
               "experiment name" if "name" in raw else "experiment name (from the file's name; set name: in the file)")
    _check_values(raw, {"out": ("a folder path, or null for runs/<name>", lambda v: v is None or _is_str(v))}, "the experiment")
    data = _mapping(raw.get("data"), "data")
    _check_keys(data, DATA_KEYS, "data")
    if "name" not in data:
        raise KdqError("data.name is required, e.g. data: {name: fashion-mnist}")
    _check_values(data, DATA_RULES, "data")
    shape = _data_shape(data["name"], {k: v for k, v in data.items() if k in _SOURCE_KEYS})
    defaults = _mapping(raw.get("train"), "train")
    _check_keys(defaults, TRAIN_KEYS, "train")
    try:
        TrainConfig.from_dict(defaults)
    except (KdqError, TypeError) as exc:
        raise KdqError(f"train: {exc}") from None
    stages_raw = _mapping(raw.get("stages"), "stages")
    if not stages_raw:
        raise KdqError("the experiment has no stages; add at least one under `stages:`")
    stages: list[Stage] = []
    for name, body in stages_raw.items():
        check_name(name if isinstance(name, str) else str(name), "stage name", reserved=RUN_FILES)
        earlier = {s.name: s for s in stages}
        stages.append(_parse_stage(str(name), _mapping(body, f"stage {name!r}"), defaults, earlier, shape))
    compare = _mapping(raw.get("compare"), "compare")
    _check_keys(compare, ("baseline", "student", "teacher"), "compare")
    kinds = {s.name: s.kind for s in stages}
    for role, stage_name in compare.items():
        if not isinstance(stage_name, str) or stage_name not in kinds:
            raise KdqError(f"compare.{role} names stage {short_repr(stage_name)}, which does not exist"
                           f"{suggest(str(stage_name), kinds)}")
        if STAGES.get(kinds[stage_name]).collect is not None:
            raise KdqError(f"compare.{role} names {kinds[stage_name]} stage {stage_name!r}, which holds several runs; "
                           "compare stages of one run each (the recipe's sweep report compares its runs)")
    return Experiment(str(raw.get("name", default_name)), data, stages, compare, raw.get("out"), raw)


def _parse_stage(name: str, body: dict[str, Any], defaults: dict[str, Any], earlier: dict[str, Stage],
                 shape: tuple[str, tuple[int, ...], int]) -> Stage:
    """One stage, checked against its kind's signature, rules and own check before any work."""
    where = f"stage {name!r}"
    kind_name = body.get("kind", "distill" if "teacher" in body else "train")
    _check_values({"kind": kind_name}, {"kind": _choice(tuple(STAGES.yaml_kinds()))}, where)
    kind = STAGES.get(kind_name)
    options = {k: v for k, v in body.items() if k != "kind"}
    # the model it trains (or several: mutual learning, a teacher-assistant chain), for the table
    model = "+".join(map(str, body["models"])) if isinstance(body.get("models"), list) else ""
    takes = kind.source_param()
    for key in ("model", "model_args"):
        if key in body and takes == "run":
            raise KdqError(f"{where}: {key!r} does not apply to a {kind.name} stage; "
                           f"it starts from the model of stage {short_repr(body.get('source'))}")
    _check_stage_keys(kind, options, where)
    _check_values(options, STAGE_RULES, where)
    _check_default_types(kind, options, where)
    if takes == "run":
        model = earlier[_source(where, body, earlier, kind.takes)].model
    if takes in ("model", "student"):
        if "model" not in body:
            raise KdqError(f"{where} needs a model, e.g. model: cnn-small (see `kdq models`)")
        model = str(body["model"])
        _check_model(where, model, _mapping(body.get("model_args"), f"{where} model_args"), shape)
    teacher = kind.parameters().get("teacher")
    if "teacher" in options or (teacher is not None and teacher.default is teacher.empty):
        given = options.get("teacher")  # one, or a list (an ensemble)
        runs = [_teacher(where, t, earlier) for t in (given if isinstance(given, list) else [given])]
        options["teacher"] = runs if isinstance(given, list) else runs[0]
        for run in runs:
            if run not in earlier:
                _check_teacher_run(where, run, shape)
    inherited = defaults if kind.inherit is None else {k: defaults[k] for k in kind.inherit if k in defaults}
    train = {**inherited, **{k: options.pop(k) for k in list(options) if k in TRAIN_KEYS}} if kind.takes_training() else {}
    try:
        TrainConfig.from_dict({**kind.train_defaults, **train})
        if kind.check is not None:
            kind.check(options, train)
    except (KdqError, TypeError) as exc:
        raise KdqError(f"{where}: {exc}") from None
    return Stage(name, kind.name, model, options, train)


def _check_stage_keys(kind: StageKind, options: dict[str, Any], where: str) -> None:
    """Every key is one the kind's entry point takes; a key of another kind says which."""
    allowed = kind.yaml_keys()
    for key in options:
        if key in allowed:
            continue
        owners = [k.name for k in STAGES if k.yaml and key in k.yaml_keys()]
        own = ", ".join(k for k in allowed if k not in TRAIN_KEYS) + (" and training options" if kind.takes_training() else "")
        if owners:
            kinds = ", ".join(owners)
            raise KdqError(f"{where}: {key!r} does not apply to a {kind.name} stage (it belongs to {kinds} stages, "
                           f"kind: {owners[0]}); it takes {own}")
        raise KdqError(f"unknown key {short_repr(key)} in {where}{suggest(str(key), allowed)}; allowed: kind, {', '.join(allowed)}")


def _check_default_types(kind: StageKind, options: dict[str, Any], where: str) -> None:
    """A key no shared rule covers (a new stage's own) must have the type of its default."""
    params = kind.parameters()
    for key, value in options.items():
        p = params.get(key)
        if key in STAGE_RULES or p is None or p.default is p.empty or p.default is None:
            continue
        if p.annotation != type(p.default).__name__:  # a richer annotation: the stage's own check decides
            continue
        typed = type(p.default)
        ok = isinstance(value, typed) and (typed is bool or not isinstance(value, bool))
        if typed is float:
            ok = _is_number(value)
        if not ok:
            raise KdqError(f"{where}: {key} must be {_TYPE_WORDS.get(typed, typed.__name__)} like its default "
                           f"{p.default!r}, got {short_repr(value)}")


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _data_shape(name: str, options: dict[str, Any]) -> tuple[str, tuple[int, ...], int]:
    """(name, input shape, classes) of a registered data set with its own options (synthetic's
    samples, features, classes), known without reading its files."""
    from kdq.data.catalog import DATASETS

    try:
        source = DATASETS.get(name)
    except KdqError as exc:
        raise KdqError(f"data.name: {exc}") from None
    try:
        source = source.configure(**options)
    except KdqError as exc:
        raise KdqError(f"data: {exc}") from None
    return name, tuple(source.input_shape), source.num_classes


def _check_model(where: str, model: str, model_args: dict[str, Any], shape: tuple[str, tuple[int, ...], int]) -> None:
    """The stage's model name and options, and its size, checked without building it."""
    from kdq.models.registry import check_model, model_input_size

    data_name, input_shape, num_classes = shape
    try:
        in_channels = model_input_size(model, input_shape, data_name)
        check_model(model, num_classes, in_channels, **model_args)
    except KdqError as exc:
        raise KdqError(f"{where}: {exc}") from None


def _check_teacher_run(where: str, run: str, shape: tuple[str, tuple[int, ...], int]) -> None:
    """A teacher given as a run directory: a kdq run, trained on this data set and input shape.

    Its classes are compared once the data is loaded (load_teacher); what model.json records
    about the data set and input shape is enough to refuse a wrong teacher before any training.
    """
    data_name, input_shape, _ = shape
    try:
        meta = saved_meta(Path(run))
    except KdqError as exc:
        raise KdqError(f"{where}: teacher: {exc}") from None
    saved_shape, saved_name = meta.get("input_shape"), meta.get("dataset")
    other_shape = saved_shape is not None and saved_shape != list(input_shape)
    if other_shape or (isinstance(saved_name, str) and saved_name != data_name):
        raise KdqError(
            f"{where}: teacher {short_repr(run)} was trained on {short_repr(saved_name)} (input {shape_text(saved_shape)}) "
            f"but the experiment's data is {data_name!r} (input {shape_text(list(input_shape))}); "
            f"train a teacher on {data_name} first"
        )


def _source(where: str, body: dict[str, Any], earlier: dict[str, Stage], takes: tuple[str, ...]) -> str:
    """The earlier stage a quantize, qat, prune, deploy or recipe stage starts from: one that
    writes a kind of run the stage takes (a float model, for most)."""
    source = body.get("source")
    fits = [n for n, s in earlier.items() if STAGES.get(s.kind).run_kind(s.options) in takes]
    if source not in fits:
        what = " or ".join(takes)
        raise KdqError(f"{where}: source must name an earlier stage that writes a {what} model "
                       f"(train, distill, prune{', quantize, qat' if 'int8' in takes else ''}){suggest(str(source), fits)}")
    return str(source)


def _teacher(where: str, teacher: Any, earlier: dict[str, Stage]) -> str:
    if teacher is None:
        raise KdqError(f"{where} distills but names no teacher; add teacher: <earlier stage or run directory>")
    if teacher not in earlier and not Path(str(teacher)).exists():
        raise KdqError(
            f"{where}: teacher {teacher!r} is neither an earlier stage nor a run directory"
            f"{suggest(str(teacher), earlier)}"
        )
    return str(teacher)
