"""Compare finished runs: find them, read their results, group seeds, and tabulate.

    rows = collect(["runs/quickstart-seeds"])    # one Row per model, seeds grouped
    print(summary_table(rows, reference="teacher", markdown=False))

A path is a run directory, an experiment folder (`kdq run`), a recipe folder, or any folder:
folders are searched for run directories (those holding results.json) at most MAX_DEPTH
levels down, in sorted order (an experiment's stages in the order it ran them).

Runs that are one model trained at several seeds become one row, with the accuracy's mean
and sample standard deviation: their recorded configs (config.yaml) are equal once the
training seed is left out and paths to other runs are cut to their last folder name (each
seed's kd run names its own seed's teacher). Every file read is untrusted: results.json is
checked for types, ranges and sizes (a confusion matrix must be classes x classes) before use.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdq.engine import describe_machine
from kdq.engine.config import WATCHING_KEYS
from kdq.errors import KdqError, short_repr, suggest
from kdq.io import read_json, read_text
from kdq.report.sweep import weight_bits
from kdq.report.table import human_bytes, markdown_table, plain_table
from kdq.rundir.claim import run_state
from kdq.rundir.layout import (
    INT8_MANIFEST, METRICS, MODEL_META, PACKED_MANIFEST, RESULTS, SPARSE_MANIFEST, SUMMARY_JSON, read_config,
    read_results,
)
from kdq.schema import MAX_CLASSES, Checker

MAX_DEPTH = 6  # folder levels searched below a given path (a recipe stage's runs lie 3 below its experiment)
MAX_RUNS = 10_000
MAX_CONFUSION_CLASSES = 1000  # a 1000 x 1000 matrix is a million counts; larger ones are not drawn anyway
MAX_EPOCHS = 100_000  # lines read from metrics.jsonl
_FIX = "the run directory is damaged; leave it out of the comparison, or retrain it"
_MODEL_KINDS = ("float", "int8", "lowbit", "onnx")  # run kinds that hold one model (kdq.rundir.layout.KINDS)
_SEED_PART = re.compile(r"(?:^|[-_.])(?:s|seed)\d+$")  # "seed1", "s0", "kd-s2": a folder named by its seed
# Training options that do not change the model: runs differing only here are the same model.
_IGNORED_TRAIN = (*WATCHING_KEYS, "eval_batch_size", "device")


@dataclass
class Row:
    """One model in a comparison: a run, or several runs of one config at different seeds.

    Numbers are means over seeds (None: not recorded); accuracy is a fraction, with its sample
    std over seeds (None for one seed); latency_ms is the median batch-1 latency and
    latency_spread_ms half its interquartile range; history (metrics.jsonl), confusion_matrix
    and per_class_accuracy are the first seed's; bits is the weight bit width of a low-bit or
    int8 model (scheme: the low-bit scheme as recorded, e.g. w4a4); role is the run's part in
    its experiment's `compare` section (teacher, student, baseline), when it has one.
    """

    label: str
    kind: str
    runtime: str
    dataset: str
    accuracy: float
    accuracy_std: float | None = None
    seeds: int = 1
    accuracies: list[float] = field(default_factory=list)
    arch: str | None = None
    params: float | None = None
    macs: float | None = None
    size_bytes: float | None = None
    latency_ms: float | None = None
    latency_spread_ms: float | None = None
    throughput_per_s: float | None = None
    train_time_s: float | None = None
    machine: str = "unrecorded machine"
    classes: list[str] = field(default_factory=list)
    per_class_accuracy: dict[str, float] = field(default_factory=dict)
    confusion_matrix: list[list[int]] | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # numbers only: epoch, lr, train_<term>, val_...
    bits: int | None = None
    scheme: str | None = None
    sparsity: float | None = None
    pruned: bool = False
    role: str | None = None
    paths: list[str] = field(default_factory=list)


# ---- finding runs


@dataclass
class _Found:
    path: Path
    role: str | None  # from the experiment's summary.json compare section
    seed: Any = None
    key: str = ""  # the config with seeds and run paths left out: equal keys, same model
    row: Row | None = None


def collect(paths: Sequence[str | Path]) -> list[Row]:
    """One Row per model found under `paths` (runs, experiments or folders of them), seeds grouped.

    Refused in one KdqError line: no paths, a path that is missing or holds no runs, a run
    directory without results.json, a damaged results.json, runs on different data sets.
    """
    if not paths:
        raise KdqError("no runs given; pass run directories or experiment folders, e.g. `kdq compare runs/quickstart`")
    found: dict[Path, _Found] = {}
    for given in paths:
        runs = _find(Path(given))
        if not runs:
            raise KdqError(f"{given} holds no kdq runs (no {RESULTS} within {MAX_DEPTH} folder levels); "
                           "pass a run directory or an experiment folder")
        for run in runs:
            found.setdefault(run.path.resolve(), run)  # a run given twice counts once
    runs = list(found.values())
    if len(runs) > MAX_RUNS:
        raise KdqError(f"{len(runs)} runs found, more than {MAX_RUNS}; pass fewer folders")
    for run in runs:
        run.row = read_run(run.path, run.role)
        run.seed, run.key = _identity(run.path, run.row)
    _check_one_dataset([r.row for r in runs])
    groups = _group(runs)
    rows = [_merge([r.row for r in group]) for group in groups]
    for row, label in zip(rows, _labels(groups)):
        row.label = label
    return rows


def _find(path: Path) -> list[_Found]:
    """The run directories at or below `path`, in order; a given run must have results.json."""
    if path.is_file() and path.name == RESULTS:
        path = path.parent
    if not path.exists():
        raise KdqError(f"{path} not found; pass a run directory or an experiment folder")
    if not path.is_dir():
        raise KdqError(f"{path} is a file; pass a run directory or an experiment folder")
    if not (path / RESULTS).is_file() and run_state(path).kind in _MODEL_KINDS:
        raise KdqError(f"{path} is a run without {RESULTS} (unfinished or interrupted); finish it "
                       "(rerun its command with --resume) or leave it out")
    out: list[_Found] = []
    _search(path, 0, None, out, set())
    return out


def _search(folder: Path, depth: int, roles: dict[str, str] | None, out: list[_Found], seen: set[Path]) -> None:
    real = folder.resolve()
    if real in seen:  # a symbolic link back up the tree
        return
    seen.add(real)
    if (folder / RESULTS).is_file():
        out.append(_Found(folder, (roles or {}).get(folder.name)))
        return  # what lies inside a run (pruning rounds, qkd phases) is part of it
    if depth >= MAX_DEPTH:
        return
    state = run_state(folder)
    if state.kind in _MODEL_KINDS:
        print(f"kdq: warning: skipping {folder}: a run without {RESULTS} (unfinished)", file=sys.stderr)
        return
    order, own_roles = _experiment_order(folder) if state.kind == "experiment" else ([], {})
    rank = {name: i for i, name in enumerate(order)}
    children = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: (rank.get(p.name, len(rank)), p.name))
    for child in children:
        _search(child, depth + 1, own_roles if state.kind == "experiment" else None, out, seen)


def _experiment_order(folder: Path) -> tuple[list[str], dict[str, str]]:
    """An experiment's stage names in the order it ran them, and {stage: role} from its
    `compare` section (summary.json; older experiments recorded the order only)."""
    if not (folder / SUMMARY_JSON).is_file():
        return [], {}
    summary = read_json(folder / SUMMARY_JSON, fix=_FIX, expect=dict)
    stages = summary.get("stages")
    order = list(dict.fromkeys(str(k).split("/")[0] for k in stages)) if isinstance(stages, dict) else []
    compare = summary.get("compare")
    if not isinstance(compare, dict):
        return order, {}
    return order, {v: k for k, v in compare.items() if isinstance(v, str) and isinstance(k, str)}


# ---- reading one run


def read_run(run_dir: str | Path, role: str | None = None) -> Row:
    """One run directory as a Row (label: the folder's name); every field checked first."""
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    if not results:
        raise KdqError(f"{run_dir} has no {RESULTS}; finish the run (rerun its command with --resume) or leave it out")
    check = Checker(run_dir / RESULTS, _FIX)
    config = read_config(run_dir)
    accuracy = _fraction(check, results, "accuracy", required=True)
    classes, per_class = _per_class(check, results, run_dir)
    env = check.mapping(results.get("environment", {}), "environment")
    kind = run_state(run_dir).kind or "float"
    runtime = _text(check, results.get("runtime", "pytorch"), "runtime")
    device_type = _text(check, env.get("device_type", ""), "environment.device_type")
    number = lambda key: _number(check, results, key)  # noqa: E731
    iqr = number("latency_ms_batch1_iqr")
    scheme = results.get("bits", config.get("bits")) if kind == "lowbit" else None
    return Row(
        label=run_dir.name, kind=kind, runtime=f"{runtime} {device_type}".strip(),
        dataset=_dataset(check, results, config, run_dir), accuracy=accuracy, accuracies=[accuracy],
        arch=_arch(run_dir, config, scheme, kind), params=number("params"), macs=number("macs"),
        size_bytes=number("size_bytes"), latency_ms=number("latency_ms_batch1"),
        latency_spread_ms=None if iqr is None else iqr / 2, throughput_per_s=number("throughput_per_s"),
        train_time_s=number("train_time_s"), machine=_machine(check, env, results),
        classes=classes, per_class_accuracy=per_class, confusion_matrix=_confusion(check, results, len(classes)),
        history=read_history(run_dir / METRICS), bits=_bits(check, kind, scheme, results),
        scheme=scheme if isinstance(scheme, str) else None, sparsity=_fraction(check, results, "sparsity"),
        pruned="pruning" in results, role=role, paths=[str(run_dir)],
    )


def _text(check: Checker, value: Any, path: str, limit: int = 200) -> str:
    check.expect(isinstance(value, str) and len(value) <= limit, value, path, f"a string of at most {limit} characters")
    return value


def _number(check: Checker, results: dict[str, Any], key: str) -> float | None:
    """A recorded measurement: a finite number >= 0, or None when absent."""
    value = results.get(key)
    if value is None:
        return None
    value = check.number(value, key)
    check.expect(value >= 0, value, key, "a number >= 0")
    return value


def _fraction(check: Checker, results: dict[str, Any], key: str, required: bool = False) -> float | None:
    if required:
        check.key(results, key)
    value = _number(check, results, key)
    if value is not None:
        check.expect(value <= 1, value, key, "a fraction in [0, 1]")
    return value


def _dataset(check: Checker, results: dict[str, Any], config: dict[str, Any], run_dir: Path) -> str:
    name = results.get("dataset", config.get("data", {}).get("name"))
    if name is None:
        raise KdqError(f"{run_dir} does not record its data set ({RESULTS} has no dataset); "
                       "leave it out of the comparison")
    return _text(check, name, "dataset")


def _per_class(check: Checker, results: dict[str, Any], run_dir: Path) -> tuple[list[str], dict[str, float]]:
    """The class names (per_class_accuracy's keys, else model.json's) and each class's accuracy."""
    per_class = results.get("per_class_accuracy")
    if per_class is not None:
        check.mapping(per_class, "per_class_accuracy")
        check.expect(len(per_class) <= MAX_CLASSES, f"{len(per_class)} classes", "per_class_accuracy",
                     f"at most {MAX_CLASSES} classes")
        for name, value in per_class.items():
            where = f"per_class_accuracy[{short_repr(name, 40)}]"
            _text(check, name, where)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
            check.expect(ok, value, where, "a fraction in [0, 1]")
        return list(per_class), {k: float(v) for k, v in per_class.items()}
    if (run_dir / MODEL_META).is_file():
        classes = read_json(run_dir / MODEL_META, fix=_FIX, expect=dict).get("classes")
        if classes is not None:
            return Checker(run_dir / MODEL_META, _FIX).strings(classes, "classes", 1, MAX_CLASSES), {}
    return [], {}


def _confusion(check: Checker, results: dict[str, Any], classes: int) -> list[list[int]] | None:
    """The confusion matrix (a list of rows, or that list as a JSON string): classes x classes
    counts, each an integer >= 0; None when not recorded."""
    matrix = results.get("confusion_matrix")
    if matrix is None:
        return None
    if isinstance(matrix, str):
        try:
            matrix = json.loads(matrix)
        except (ValueError, RecursionError):
            check.fail("confusion_matrix", "is a string that is not a JSON list of rows")
    n = classes or (len(matrix) if isinstance(matrix, list) else 0)
    if n > MAX_CONFUSION_CLASSES:
        return None  # too large to draw; only its size was looked at
    shape = f"a list of {n} rows of {n} counts, one per class"
    check.expect(isinstance(matrix, list) and len(matrix) == n, _size(matrix), "confusion_matrix", shape)
    out = []
    for i, cells in enumerate(matrix):
        check.expect(isinstance(cells, list) and len(cells) == n, _size(cells), f"confusion_matrix[{i}]", f"{n} counts")
        for j, c in enumerate(cells):
            ok = isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0 and c == int(c)
            check.expect(ok, c, f"confusion_matrix[{i}][{j}]", "a count (an integer >= 0)")
        out.append([int(c) for c in cells])
    return out


def _size(value: Any) -> str:
    return f"{len(value)} items" if isinstance(value, list) else short_repr(value)


def _machine(check: Checker, env: dict[str, Any], results: dict[str, Any]) -> str:
    """Where latency and throughput were measured: the CPU with its extensions, or the GPU,
    and the thread count (kdq.engine.describe_machine)."""
    if "device" not in env:
        return "unrecorded machine"
    for key in ("device", "cpu", "device_type"):
        if key in env:
            _text(check, env[key], f"environment.{key}")
    if env.get("cpu_flags") is not None:
        for i, flag in enumerate(check.items(env["cpu_flags"], "environment.cpu_flags", 0, 64)):
            _text(check, flag, f"environment.cpu_flags[{i}]", 40)
    threads = results.get("threads", env.get("threads"))
    threads = None if threads is None else check.integer(threads, "threads", 1, 1 << 16)
    return describe_machine(env) + ("" if threads is None else f", {threads} threads")


def _bits(check: Checker, kind: str, scheme: Any, results: dict[str, Any]) -> int | None:
    """Weight bits: a low-bit run's scheme (w4a4 -> 4), 8 for an int8 model, else None."""
    if kind == "lowbit" and scheme is not None:
        try:
            return weight_bits(scheme)
        except KdqError as err:
            check.fail("bits", str(err))
    if kind == "int8" or results.get("precision") == "int8":
        return 8
    return None


def _arch(run_dir: Path, config: dict[str, Any], scheme: Any, kind: str) -> str | None:
    """The model's name, with its precision when quantized: from config.yaml, else from the
    saved model's description (a pruned or quantized run names only its source run)."""
    model = config.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    for file, key in ((MODEL_META, "architecture"), (SPARSE_MANIFEST, "spec"), (INT8_MANIFEST, "spec"),
                      (PACKED_MANIFEST, "spec")):
        if name is not None:
            break
        if (run_dir / file).is_file():
            spec = read_json(run_dir / file, fix=_FIX, expect=dict).get(key)
            name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str):
        return None
    name = name[:60]
    if kind == "lowbit" and isinstance(scheme, str):
        return f"{name} {scheme[:16]}"
    return f"{name} int8" if kind == "int8" else name


def read_history(path: str | Path) -> list[dict[str, float]]:
    """metrics.jsonl as a list of per-epoch records (numbers only); [] when absent.

    A torn last line (a run killed mid-write) is dropped; any other unreadable line is a KdqError.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = read_text(path, fix=_FIX).splitlines()
    if len(lines) > MAX_EPOCHS:
        raise KdqError(f"{path} has {len(lines)} lines, more than {MAX_EPOCHS} epochs; {_FIX}")
    history = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            if i == len(lines) - 1:
                break
            raise KdqError(f"{path} line {i + 1} is not JSON; {_FIX}") from None
        if not isinstance(record, dict):
            raise KdqError(f"{path} line {i + 1} must be a JSON object, got {short_repr(record)}; {_FIX}")
        history.append({str(k)[:100]: v for k, v in record.items() if isinstance(v, (int, float))
                        and not isinstance(v, bool) and math.isfinite(v)})
    return history


# ---- grouping seeds


def _identity(run_dir: Path, row: Row) -> tuple[Any, str]:
    """(training seed, key): runs with equal keys are one model at different seeds."""
    config = read_config(run_dir)
    if not config:
        return None, f"path:{run_dir.resolve()}"  # nothing recorded: a model of its own
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    seed = train.get("seed", config.get("seed"))
    same = {k: v for k, v in config.items() if k != "train"}
    same["train"] = {k: v for k, v in train.items() if k not in _IGNORED_TRAIN}
    key = json.dumps([row.kind, row.dataset, _model_identity(same)], sort_keys=True, default=str)
    return seed, key


def _model_identity(value: Any) -> Any:
    """`value` without what differs between seeds of one model: every seed (seed, labeled_seed,
    ...), options left unset (None: a key a later kdq version added), and paths to other runs
    cut to their folder name (seed folders left out)."""
    if isinstance(value, dict):
        return {k: _model_identity(v) for k, v in value.items()
                if v is not None and not (isinstance(k, str) and (k == "seed" or k.endswith("_seed")))}
    if isinstance(value, list):
        return [_model_identity(v) for v in value]
    if isinstance(value, str) and "/" in value:
        parts = [p for p in value.rstrip("/").split("/") if p and not _SEED_PART.fullmatch(p)]
        return _strip_seed(parts[-1]) if parts else ""
    return value


def _strip_seed(name: str) -> str:
    """"kd-s2" -> "kd", "seed1" -> "" (a folder named by its seed), "teacher" -> "teacher"."""
    return _SEED_PART.sub("", name)


def _group(runs: list[_Found]) -> list[list[_Found]]:
    """Runs with equal keys, in first-found order; a group holds each seed once (two runs of one
    config at one seed are kept apart by their folders, seed folders left out)."""
    by_key: dict[str, list[_Found]] = {}
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    groups = []
    for members in by_key.values():
        if len({repr(r.seed) for r in members}) < len(members):
            places: dict[str, list[_Found]] = {}
            for r in members:
                places.setdefault("/".join(_strip_seed(p) for p in r.path.resolve().parts), []).append(r)
            parts = [m for place in places.values() for m in _split_repeats(place)]
        else:
            parts = [members]
        groups += [sorted(g, key=_seed_order) for g in parts]
    first = {id(r): i for i, r in enumerate(runs)}
    return sorted(groups, key=lambda g: min(first[id(r)] for r in g))


def _seed_order(run: _Found) -> tuple[Any, ...]:
    """Seeds in numeric order (the first seed's history is the row's), unrecorded ones last."""
    numeric = isinstance(run.seed, int) and not isinstance(run.seed, bool)
    return (0, run.seed if numeric else 0, "" if numeric else repr(run.seed), str(run.path))


def _split_repeats(members: list[_Found]) -> list[list[_Found]]:
    seeds = [repr(r.seed) for r in members]
    return [members] if len(set(seeds)) == len(seeds) else [[r] for r in members]


def _merge(rows: list[Row]) -> Row:
    """One Row for a model's seeds: means of the numbers, accuracy's sample std, the first seed's details."""
    first = rows[0]
    if len(rows) == 1:
        return first
    mean = lambda key: _mean([getattr(r, key) for r in rows])  # noqa: E731
    accuracies = [r.accuracy for r in rows]
    per_class = {c: statistics.fmean(r.per_class_accuracy[c] for r in rows)
                 for c in first.per_class_accuracy if all(c in r.per_class_accuracy for r in rows)}
    return replace(
        first, accuracy=statistics.fmean(accuracies), accuracy_std=statistics.stdev(accuracies), seeds=len(rows),
        accuracies=accuracies, per_class_accuracy=per_class, paths=[p for r in rows for p in r.paths],
        machine=" / ".join(dict.fromkeys(r.machine for r in rows)),  # seeds measured apart: flagged as another machine
        **{k: mean(k) for k in ("params", "macs", "size_bytes", "latency_ms", "latency_spread_ms",
                                "throughput_per_s", "train_time_s", "sparsity")},
    )


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _labels(groups: list[list[_Found]]) -> list[str]:
    """Each row's name: the shortest tail of its folder path that tells it from every other row.

    Folder names that differ between a group's seeds are left out (seed1, s0) or cut to what
    they share ("kd-s0", "kd-s1" -> "kd").
    """
    tails = [_common_parts([r.path.resolve().parts for r in group]) for group in groups]
    labels = []
    for tail in tails:
        for n in range(1, len(tail) + 1):
            label = "/".join(tail[-n:])
            if sum(1 for t in tails if "/".join(t[-n:]) == label) == 1:
                break
        labels.append(label)
    for i, label in enumerate(labels):  # still equal (the same folder name all the way up): numbered
        if labels.count(label) > 1:
            labels[i] = f"{label} #{labels[:i + 1].count(label)}"
    return labels


def _common_parts(paths: list[tuple[str, ...]]) -> list[str]:
    if len(paths) == 1:
        return list(paths[0]) or ["/"]
    out = []
    for parts in zip(*(reversed(p) for p in paths)):
        if len(set(parts)) == 1:
            out.append(parts[0])
            continue
        stripped = {_strip_seed(p) for p in parts}
        if len(stripped) > 1:
            out.append(parts[0])  # differs by more than a seed: the first seed's name
        elif stripped != {""}:
            out.append(stripped.pop())  # "kd-s0", "kd-s1" -> "kd"; "seed0", "seed1" are left out
    return list(reversed(out)) or ["/"]


# ---- checks and the reference


def _check_one_dataset(rows: list[Row]) -> None:
    """Runs on different data sets are never compared in one table: their numbers mean different things."""
    by_data: dict[str, list[str]] = {}
    for row in rows:
        by_data.setdefault(row.dataset, []).extend(row.paths)
    if len(by_data) > 1:
        (a, runs_a), (b, runs_b) = list(by_data.items())[:2]
        more = f" and {len(by_data) - 2} more" if len(by_data) > 2 else ""
        raise KdqError(f"runs on different data sets: {a!r} ({_some(runs_a)}) and {b!r} ({_some(runs_b)}){more}; "
                       "report them separately")


def _some(paths: list[str]) -> str:
    return ", ".join(paths[:2]) + (f" and {len(paths) - 2} more" if len(paths) > 2 else "")


def check_rows(rows: list[Row]) -> None:
    """Rows a table or report can show: at least one, one data set, distinct labels."""
    if not rows:
        raise KdqError("no runs to compare; pass run directories or experiment folders")
    _check_one_dataset(rows)
    labels = [r.label for r in rows]
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated is not None:
        raise KdqError(f"two rows are labelled {repeated!r}; give each row its own label")


def pick_reference(rows: list[Row], reference: str | None = None) -> Row:
    """The row named `reference`; by default the experiment's teacher (its compare section), else the first row."""
    if reference is None:
        return next((r for r in rows if r.role == "teacher"), rows[0])
    for row in rows:
        if row.label == reference:
            return row
    labels = [r.label for r in rows]
    raise KdqError(f"unknown --reference {reference!r}{suggest(reference, labels)}; choose one of the rows: "
                   f"{', '.join(labels[:20])}{' ...' if len(labels) > 20 else ''}")


# ---- the summary table

COLUMNS = (
    ("label", "model"), ("arch", "architecture"), ("kind", "kind"), ("runtime", "runs on"), ("params", "params"),
    ("macs", "MACs"), ("size", "size"), ("accuracy", "accuracy (± std over seeds)"),
    ("latency", "latency b=1 ms (± IQR/2)"), ("throughput", "throughput img/s"), ("train_time", "train time s"),
)
_MARKERS = ("†", "‡", "§", "¶", "#")


def _figure(value: float | None, show: Callable[[float], str], ref: float | None = None) -> str:
    """A number as `show` writes it, with its ratio to the reference's `ref` when that is given."""
    if value is None:
        return "-"
    if not ref:
        return show(value)
    r = value / ref
    return show(value) + (f" ({r:.0f}x)" if r >= 100 else f" ({r:.1f}x)" if r >= 10 else f" ({r:.2f}x)")


def _count(value: float) -> str:
    return f"{value / 1e6:,.1f} M" if value >= 1e7 else f"{value:,.0f}"


def _accuracy_cell(row: Row, ref: Row) -> str:
    text = f"{row.accuracy:.4f}"
    if row.seeds > 1:
        text += f" ± {row.accuracy_std:.4f} ({row.seeds} seeds)"
    return text if row is ref else text + f" ({(row.accuracy - ref.accuracy) * 100:+.2f} pt)"


def summary_cells(rows: list[Row], reference: str | None = None) -> tuple[list[dict[str, str]], list[str]]:
    """The table's cells (COLUMNS keys, plain unescaped text) and its notes: each figure with its
    ratio to the reference row (accuracy: the difference in points), and a footnote for every
    machine other than the reference's (those rows' latency and throughput are not compared)."""
    check_rows(rows)
    ref = pick_reference(rows, reference)
    markers: dict[str, str] = {}
    cells = []
    for row in rows:
        here = row.machine == ref.machine
        if not here and row.machine not in markers:
            markers[row.machine] = _MARKERS[len(markers)] if len(markers) < len(_MARKERS) else f"*{len(markers) + 1}"
        against = None if row is ref else ref  # no ratios on the reference's own row
        timed = against if here else None  # latency and throughput measured elsewhere: no ratio
        spread = "" if row.latency_spread_ms is None else f" ± {row.latency_spread_ms:.3f}"
        cells.append({
            "label": row.label + (" (reference)" if row is ref else "") + ("" if here else f" {markers[row.machine]}"),
            "arch": row.arch or "-", "kind": row.kind, "runtime": row.runtime,
            "params": _figure(row.params, _count, against and against.params),
            "macs": _figure(row.macs, _count, against and against.macs),
            "size": _figure(row.size_bytes, human_bytes, against and against.size_bytes),
            "accuracy": _accuracy_cell(row, ref),
            "latency": _figure(row.latency_ms, lambda v: f"{v:.3f}{spread}", timed and timed.latency_ms),
            "throughput": _figure(row.throughput_per_s, "{:,.0f}".format, timed and timed.throughput_per_s),
            "train_time": _figure(row.train_time_s, "{:,.0f}".format, against and against.train_time_s),
        })
    models = f"{len(rows)} model{'' if len(rows) == 1 else 's'}"
    notes = [f"{models} on {ref.dataset}; ratios (x) and accuracy differences (pt) are against {ref.label}, "
             f"measured on {ref.machine}."]
    notes += [f"{mark} measured on {machine}, not on the reference's machine ({ref.machine}): its latency and "
              "throughput are not compared with the reference." for machine, mark in markers.items()]
    return cells, notes


def summary_table(rows: list[Row], reference: str | None = None, markdown: bool = True) -> str:
    """The summary table with its notes: Markdown (strings from results escaped), or plain terminal text."""
    cells, notes = summary_cells(rows, reference)
    if markdown:
        table = markdown_table([{k: md_escape(v) for k, v in c.items()} for c in cells], COLUMNS)
        return table + "\n\n" + "\n".join(f"- {md_escape(n)}" for n in notes) + "\n"
    table = plain_table([{k: terminal_safe(v) for k, v in c.items()} for c in cells], COLUMNS)
    return table + "\n\n" + "\n".join(terminal_safe(n) for n in notes) + "\n"


def compare(paths: Sequence[str | Path], reference: str | None = None, markdown: bool = False) -> str:
    """`kdq compare`: the summary table of the runs under `paths` (see collect and summary_table)."""
    return summary_table(collect(paths), reference, markdown)


# ---- text from results files, made safe where it is shown


def md_escape(text: str) -> str:
    """`text` for a Markdown cell or line: HTML and Markdown syntax shown literally, never run."""
    text = terminal_safe(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_\[\]|#!])", r"\\\1", text)


def terminal_safe(text: str) -> str:
    """`text` without control characters (an escape sequence in a folder name must not drive the terminal)."""
    return "".join(c if c.isprintable() else "?" for c in str(text))
