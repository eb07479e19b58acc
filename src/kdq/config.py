"""YAML experiments: plain data, validated against typed schemas before any work starts.

    name: quickstart
    data: {name: fashion-mnist, subset: 20000}
    train: {batch_size: 128}              # defaults for every stage
    stages:
      teacher:  {kind: train, model: resnet20, epochs: 4}
      baseline: {kind: train, model: cnn-small, epochs: 4}
      kd:       {kind: distill, model: cnn-small, teacher: teacher, temperature: 4, alpha: 0.7}
    compare: {baseline: baseline, student: kd}

Overrides `KEY.PATH=VALUE` address a stage by its name first (`teacher.epochs=2`), else a
top-level section (`data.subset=1000`, `train.lr=0.1`); values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdq.distill import TEACHER_MODES, KDLoss
from kdq.engine.config import SEED_MAX, TrainConfig
from kdq.errors import KdqError, short_repr, suggest
from kdq.io import parse_yaml, read_yaml
from kdq.rundir import RUN_FILES, check_name

TOP_LEVEL = ("name", "out", "data", "train", "stages", "compare")
DATA_KEYS = ("name", "data_dir", "val_size", "subset", "seed", "download")
STAGE_KINDS = ("train", "distill", "quantize", "qat", "recipe")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "extra")
# int8 stages start from an earlier stage's float model (`source`)
QUANT_CHOICES = {
    "method": ("static", "dynamic"),
    "backend": ("x86", "fbgemm", "qnnpack"),
    "observer": ("minmax", "moving_average", "histogram"),
}
QUANT_KEYS_BY_KIND = {
    "quantize": ("method", "calibration_batches", "backend", "observer", "per_channel", "skip"),
    "qat": ("backend", "per_channel", "freeze_bn_epoch", "freeze_observer_epoch",
            "bits", "quantizer", "act_quantizer", "first_last_bits"),
}
LOWBIT_KEYS = ("bits", "quantizer", "act_quantizer", "first_last_bits")  # a qat stage with bits: low-bit
INT8_QAT_KEYS = ("backend", "per_channel", "freeze_bn_epoch", "freeze_observer_epoch")
QUANT_KEYS = ("source", *dict.fromkeys(QUANT_KEYS_BY_KIND["quantize"] + QUANT_KEYS_BY_KIND["qat"]))
# a recipe stage runs kdq.recipes on an earlier float stage: one low-bit run per scheme and seed
RECIPE_KEYS = ("recipe", "seeds", "phases", "teacher_bits", "cosine_weight")
RECIPE_OPTIONS = ("teacher", "temperature", "alpha", *LOWBIT_KEYS, *RECIPE_KEYS[2:])
STAGE_KEYS = ("kind", "model", "model_args", "teacher", "temperature", "alpha", "teacher_mode") + TRAIN_KEYS + QUANT_KEYS + RECIPE_KEYS


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
    "kind": _choice(STAGE_KINDS),
    "model": ("a model name (see `kdq models`)", _is_str),
    "model_args": ("a mapping of model options, e.g. {width: 16}", lambda v: v is None or isinstance(v, dict)),
    "teacher": ("an earlier stage's name or a run directory", _is_str),
    "temperature": ("> 0 and finite", lambda v: _is_number(v) and v > 0),
    "alpha": ("in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "teacher_mode": _choice(TEACHER_MODES),
    "source": ("an earlier stage's name", _is_str),
    **{key: _choice(choices) for key, choices in QUANT_CHOICES.items()},
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
    kind: str
    model: str
    train: TrainConfig
    model_args: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None  # an earlier stage's name, or a run directory
    temperature: float = 4.0
    alpha: float = 0.7
    teacher_mode: str = "online"
    source: str | None = None  # quantize / qat: the earlier stage whose float model is used
    quant: dict[str, Any] = field(default_factory=dict)


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
    shape = _data_shape(data["name"])
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
        stage = _parse_stage(str(name), _mapping(body, f"stage {name!r}"), defaults, earlier)
        if stage.kind in ("train", "distill"):
            _check_model(f"stage {name!r}", stage, shape)
        if stage.teacher is not None and stage.teacher not in earlier:
            _check_teacher_run(f"stage {name!r}", stage.teacher, shape)
        stages.append(stage)
    compare = _mapping(raw.get("compare"), "compare")
    _check_keys(compare, ("baseline", "student", "teacher"), "compare")
    kinds = {s.name: s.kind for s in stages}
    for role, stage_name in compare.items():
        if not isinstance(stage_name, str) or stage_name not in kinds:
            raise KdqError(f"compare.{role} names stage {short_repr(stage_name)}, which does not exist"
                           f"{suggest(str(stage_name), kinds)}")
        if kinds[stage_name] == "recipe":
            raise KdqError(f"compare.{role} names recipe stage {stage_name!r}, which holds one run per scheme; "
                           "compare train, distill, quantize or qat stages (the recipe's sweep report compares its runs)")
    return Experiment(str(raw.get("name", default_name)), data, stages, compare, raw.get("out"), raw)


def _data_shape(name: str) -> tuple[str, tuple[int, ...], int]:
    """(name, input shape, classes) of a registered data set, known without reading its files."""
    from kdq.data.catalog import DATASETS

    try:
        source = DATASETS.get(name)
    except KdqError as exc:
        raise KdqError(f"data.name: {exc}") from None
    return name, tuple(source.input_shape), source.num_classes


def _check_model(where: str, stage: Stage, shape: tuple[str, tuple[int, ...], int]) -> None:
    """The stage's model name and options, and its size, checked without building it."""
    from kdq.models.registry import check_model, model_input_size

    data_name, input_shape, num_classes = shape
    try:
        in_channels = model_input_size(stage.model, input_shape, data_name)
        check_model(stage.model, num_classes, in_channels, **stage.model_args)
    except KdqError as exc:
        raise KdqError(f"{where}: {exc}") from None


def _check_teacher_run(where: str, run: str, shape: tuple[str, tuple[int, ...], int]) -> None:
    """A teacher given as a run directory: a kdq run, trained on this data set and input shape.

    Its classes are compared once the data is loaded (load_teacher); what model.json records
    about the data set and input shape is enough to refuse a wrong teacher before any training.
    """
    from kdq.api import saved_meta, shape_text

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


def _check_lowbit(where: str, quant: dict[str, Any]) -> None:
    """A qat stage is int8 or low-bit: reject mixed keys, and a bad scheme before any training."""
    lowbit = [k for k in LOWBIT_KEYS if k in quant]
    if not lowbit:
        return
    if "bits" not in quant:
        raise KdqError(f"{where}: {lowbit[0]!r} needs bits, e.g. bits: w4a4")
    if not isinstance(quant["bits"], str):
        raise KdqError(f"{where}: bits must be one scheme such as w4a4 in a qat stage (a recipe stage takes a list)")
    mixed = [k for k in INT8_QAT_KEYS if k in quant]
    if mixed:
        raise KdqError(f"{where}: {mixed[0]!r} is an int8 QAT option and does not apply with bits: {quant['bits']}")
    from kdq.lowbit_api import lowbit_config

    try:
        lowbit_config(str(quant["bits"]), quant.get("quantizer", "lsq"), quant.get("act_quantizer"),
                      quant.get("first_last_bits", 8))
    except KdqError as exc:
        raise KdqError(f"{where}: {exc}") from None


def _parse_stage(name: str, body: dict[str, Any], defaults: dict[str, Any], earlier: dict[str, Stage]) -> Stage:
    where = f"stage {name!r}"
    _check_keys(body, STAGE_KEYS, where)
    _check_values(body, STAGE_RULES, where)
    kind = body.get("kind", "distill" if "teacher" in body else "train")
    if kind not in STAGE_KINDS:
        raise KdqError(f"{where}: kind must be one of {', '.join(STAGE_KINDS)}, got {kind!r}")
    if kind == "recipe":
        return _parse_recipe(name, body, defaults, earlier)
    for key in RECIPE_KEYS:
        if key in body:
            raise KdqError(f"{where}: {key!r} belongs to recipe stages (kind: recipe)")
    if kind in ("quantize", "qat"):
        source = _float_source(where, body, earlier)
        for key in ("model", "model_args"):
            if key in body:
                raise KdqError(f"{where}: {key!r} does not apply to a {kind} stage; it quantizes the model of stage {source!r}")
        body = {**body, "model": earlier[source].model}
        for key in QUANT_KEYS[1:]:
            if key in body and key not in QUANT_KEYS_BY_KIND[kind]:
                raise KdqError(f"{where}: {key!r} does not apply to a {kind} stage; it takes {', '.join(QUANT_KEYS_BY_KIND[kind])}")
        quant = {k: body[k] for k in QUANT_KEYS_BY_KIND[kind] if k in body}
        if kind == "qat":
            _check_lowbit(where, quant)
            # fine-tuning keeps its own gentle defaults: only the stage's own training keys and
            # the run-control defaults (batch size, device, progress) carry over
            carried = {k: defaults[k] for k in ("batch_size", "device", "progress", "amp", "seed") if k in defaults}
            quant["train"] = {**carried, **{k: v for k, v in body.items() if k in TRAIN_KEYS}}
    if "model" not in body:
        raise KdqError(f"{where} needs a model, e.g. model: cnn-small (see `kdq models`)")
    train_values = {**defaults, **{k: v for k, v in body.items() if k in TRAIN_KEYS}}
    try:
        train = TrainConfig.from_dict(train_values)
    except TypeError as exc:
        raise KdqError(f"{where}: {exc}") from None
    except KdqError as exc:
        raise KdqError(f"{where}: {exc}") from None
    stage = Stage(name, kind, str(body["model"]), train, _mapping(body.get("model_args"), f"{where} model_args"))
    if kind in ("quantize", "qat"):
        stage.source, stage.quant = str(body["source"]), quant
    if kind == "distill" or (kind == "qat" and "teacher" in body):
        stage.teacher = _teacher(where, body.get("teacher"), earlier)
        stage.temperature = body.get("temperature", 4.0)
        stage.alpha = body.get("alpha", 0.7)
        stage.teacher_mode = body.get("teacher_mode", "online")
        try:
            KDLoss(stage.temperature, stage.alpha)
        except KdqError as exc:
            raise KdqError(f"{where}: {exc}") from None
        if stage.teacher_mode not in TEACHER_MODES:
            raise KdqError(f"{where}: teacher_mode must be one of {', '.join(TEACHER_MODES)}")
    return stage


def _float_source(where: str, body: dict[str, Any], earlier: dict[str, Stage]) -> str:
    """The earlier train or distill stage a quantize, qat or recipe stage starts from."""
    source = body.get("source")
    if source not in earlier or earlier[source].kind not in ("train", "distill"):
        floats = [n for n, s in earlier.items() if s.kind in ("train", "distill")]
        raise KdqError(f"{where}: source must name an earlier train or distill stage{suggest(str(source), floats)}")
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


def _parse_recipe(name: str, body: dict[str, Any], defaults: dict[str, Any], earlier: dict[str, Stage]) -> Stage:
    """A recipe stage: `recipe` run on `source` at `bits` for each of `seeds`, checked before any work."""
    from kdq.recipes import RECIPES, check_recipe

    where = f"stage {name!r}"
    source = _float_source(where, body, earlier)
    if "recipe" not in body:
        raise KdqError(f"{where} needs a recipe: one of {', '.join(RECIPES.names())}")
    not_here = [k for k in body if k not in ("kind", "source", "recipe", "seeds", *RECIPE_OPTIONS, *TRAIN_KEYS)]
    if not_here:
        raise KdqError(f"{where}: {not_here[0]!r} does not apply to a recipe stage")
    seeds = body.get("seeds", [defaults.get("seed", 0)])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise KdqError(f"{where}: seeds must be a list of integers, e.g. seeds: [0, 1]")
    options = {k: body[k] for k in RECIPE_OPTIONS if k in body}
    if "teacher" in options:
        options["teacher"] = _teacher(where, options["teacher"], earlier)
    # like qat stages: the stage's own training keys and the run-control defaults carry over
    carried = {k: defaults[k] for k in ("batch_size", "device", "progress", "amp") if k in defaults}
    options.update(carried, **{k: v for k, v in body.items() if k in TRAIN_KEYS and k != "seed"})
    try:
        check_recipe(str(body["recipe"]), options)
    except KdqError as exc:
        raise KdqError(f"{where}: {exc}") from None
    model = earlier[source].model
    stage = Stage(name, "recipe", model, TrainConfig.from_dict({}), source=source,
                  quant={"recipe": str(body["recipe"]), "seeds": seeds, **options})
    stage.teacher = options.get("teacher")
    return stage
