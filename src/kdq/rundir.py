"""The run directory: the unit of output. Weights in safetensors, everything else in JSON/YAML."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from torch import nn

from kdq.errors import KdqError, short_repr
from kdq.io import load_weights, read_json, read_yaml, save_weights, write_json, write_text
from kdq.schema import Checker

WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
CONFIG = "config.yaml"
RESULTS = "results.json"
FORMAT = "kdq-model"
_RESULT_NUMBERS = ("accuracy", "top5", "params", "size_bytes", "latency_ms_batch1", "throughput_per_s", "train_time_s")


def save_model(run_dir: str | Path, model: nn.Module, data_meta: dict[str, Any]) -> Path:
    """Write model.safetensors and model.json: enough to rebuild the model without pickle."""
    run_dir = Path(run_dir)
    save_weights(run_dir / WEIGHTS, model.state_dict())
    meta = {"format": FORMAT, "version": 1, "architecture": getattr(model, "kdq_spec", None),
            "class": f"{type(model).__module__}.{type(model).__qualname__}",  # for messages only: never imported
            **data_meta}
    write_json(run_dir / MODEL_META, meta)
    return run_dir / WEIGHTS


def read_model_meta(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KdqError(f"run directory {str(run_dir)!r} not found; create it with `kdq train ... --out {run_dir}`")
    meta_path = run_dir / MODEL_META
    if not meta_path.exists():
        hint = " (training was interrupted: rerun the same command with --resume)" if (run_dir / "checkpoint.pt").exists() else ""
        raise KdqError(f"{run_dir} holds no finished model: {MODEL_META} is missing{hint}")
    meta = read_json(meta_path, expect=dict)
    if meta.get("format") != FORMAT:
        raise KdqError(f"{meta_path} is not a kdq model description (format {short_repr(meta.get('format'))})")
    check = Checker(meta_path)
    arch = check.key(meta, "architecture")
    if arch is not None:  # None: a user's own module, loaded with module=
        check.model_spec(arch, "architecture")
    check.data_fields(meta)
    return meta


def _check_rebuildable(run_dir: Path, arch: dict[str, Any] | None, cls: Any) -> None:
    """Refuse, in one line saying how to fix it, a model this process has no registered builder for."""
    from kdq.models.registry import check_registered

    what = f" (class {short_repr(cls)})" if isinstance(cls, str) else ""
    if arch is None:
        raise KdqError(
            f"{run_dir} holds a custom model{what} built without kdq.models.create_model, so kdq cannot rebuild it; "
            "register its class with kdq.models.register_model, train it by that name and pass the registering module "
            "with `kdq --import MODULE`, or load it in Python with kdq.load_model(path, module=YourModel())"
        )
    check_registered(arch["name"], str(run_dir), cls)


def load_model(run_dir: str | Path, module: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model from its run directory (or load the weights into `module`)."""
    from kdq.models import create_model

    run_dir = Path(run_dir)
    meta = read_model_meta(run_dir)
    if module is None:
        arch = meta.get("architecture")
        _check_rebuildable(run_dir, arch, meta.get("class"))
        module = create_model(arch["name"], arch["num_classes"], arch["in_channels"], **arch.get("kwargs", {}))
    try:
        module.load_state_dict(load_weights(run_dir / WEIGHTS))
    except (RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise KdqError(f"weights in {run_dir / WEIGHTS} do not fit the model: {first}") from None
    return module, meta


def write_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    return write_text(Path(run_dir) / CONFIG, yaml.safe_dump(config, sort_keys=False))


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    config = read_yaml(path) if path.exists() else {}
    check = Checker(path)
    check.mapping(config)
    check.mapping(config.get("data", {}), "data")
    return config


def write_results(run_dir: str | Path, results: dict[str, Any]) -> Path:
    return write_json(Path(run_dir) / RESULTS, results)


def read_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS
    if not path.exists():
        return {}
    results = read_json(path, expect=dict)
    check = Checker(path)
    for key in _RESULT_NUMBERS:  # what summaries and reports compute with
        if results.get(key) is not None:
            check.number(results[key], key)
    if "environment" in results:
        check.mapping(results["environment"], "environment")
    return results


# ---- what a run directory holds, and who is writing it
#
# Every command that writes a run directory first calls `claim`: it refuses, in one line and
# before anything is written, to mix runs of different kinds, to replace a finished run
# unasked, to resume a run with other options, or to write where another process is writing.

RUN_FILE = "run.json"  # {"kind": ..., "command": ..., "status": "running" | "finished"}
LOCK_FILE = ".kdq.lock"  # flock()ed by the process writing the directory; holds its pid
CONFUSION = "confusion_matrix.png"
EVAL_PREFIX = "eval-"  # `kdq evaluate RUN` writes eval-<split>.json / eval-<data>-<split>.json
KINDS = ("float", "int8", "lowbit", "recipe", "experiment")
STATUSES = ("running", "finished")
# Stage, experiment and scheme names become folder names: plain names only, never paths.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
# The files kdq writes in a run directory (names kept here so --overwrite knows exactly what
# is kdq's); any other file in the folder, e.g. an exported model.onnx, is left alone.
RUN_FILES = (
    RUN_FILE, CONFIG, RESULTS, WEIGHTS, MODEL_META, CONFUSION, "training_curves.png",
    "metrics.jsonl", "checkpoint.pt", "best.safetensors", "best_objective.safetensors",  # kdq.engine.train
    "quantized.safetensors", "quantized.json",  # kdq.quant.serialize
    "packed.safetensors", "packed.json",  # kdq.quant.lowbit.pack
    "stage.json", "summary.json", "summary.md",  # kdq.experiment
    "phase.json", "sweep.md", "sweep.png",  # kdq.recipes
)
PHASE_DIRS = ("self_studying", "co_studying")  # qkd's intermediate phases inside a scheme's run
# What each command's config.yaml "command" makes (for run directories written before run.json)
_KIND_OF_COMMAND = {"train": "float", "distill": "float", "quantize": "int8", "qat": "int8",
                    "qat-lowbit": "lowbit", "recipe": "lowbit"}
# A resumed run may change these training options (train longer, on another device); any other
# difference from its config.yaml (model, optimizer, lr, data...) is refused.
RESUME_MAY_CHANGE = ("epochs", "patience", "device", "progress", "eval_batch_size", "amp")
_RESUME_MAY_CHANGE_DATA = ("data_dir", "download")

_HELD: dict[Path, int] = {}  # run directories this process has claimed (nested claims are free)


def check_name(name: Any, what: str, reserved: tuple[str, ...] = ()) -> str:
    """`name` if it is a plain name (NAME_PATTERN) usable as a folder name and not one of
    `reserved` (files kdq writes beside it), else a KdqError."""
    import re

    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise KdqError(f"{what} {str(name)[:80]!r} is not a plain name: use letters, digits, '.', '_' and '-', "
                       "starting with a letter or digit, at most 64 characters (never a path)")
    if name in reserved:
        raise KdqError(f"{what} {name!r} is the name of a file kdq writes beside it; choose another name")
    return name


def eval_file(split: str, data: str | None = None) -> str:
    """The file `kdq evaluate` writes in a run directory: eval-<split>.json for the run's own
    data set, eval-<data>-<split>.json for another (its confusion matrix: the same name, .png)."""
    import re

    if data is None:
        return f"{EVAL_PREFIX}{split}.json"
    return f"{EVAL_PREFIX}{re.sub(r'[^A-Za-z0-9._-]', '_', data)[:64]}-{split}.json"


class RunState(NamedTuple):
    kind: str | None  # one of KINDS; None: nothing kdq wrote is there
    status: str | None  # "running" (also: interrupted) or "finished"
    command: str | None


def run_state(run_dir: str | Path) -> RunState:
    """What `run_dir` holds: from its run.json, else inferred from its files (older runs)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return RunState(None, None, None)
    if (run_dir / RUN_FILE).exists():
        fix = "delete it (kdq then infers the run's kind from its files) or write to another --out"
        record = read_json(run_dir / RUN_FILE, fix=fix, expect=dict)
        if record.get("kind") not in KINDS or record.get("status") not in STATUSES:
            raise KdqError(f"{run_dir / RUN_FILE} is not a kdq run record (kind {str(record.get('kind'))[:20]!r}, "
                           f"status {str(record.get('status'))[:20]!r}); {fix}")
        return RunState(record["kind"], record["status"], str(record.get("command")))
    names = {p.name for p in run_dir.iterdir() if not p.name.startswith(".")}
    kind, command = _infer_kind(run_dir, names)
    if kind is None:
        return RunState(None, None, None)
    done = {"recipe": "sweep.md", "experiment": "summary.json"}.get(kind, RESULTS)
    return RunState(kind, "finished" if done in names else "running", command)


def _infer_kind(run_dir: Path, names: set[str]) -> tuple[str | None, str | None]:
    """(kind, command) of a run directory written before run.json existed."""
    import re

    command = None
    if CONFIG in names:
        try:
            from kdq.io import read_yaml

            config = read_yaml(run_dir / CONFIG)
            command = config.get("command") if isinstance(config, dict) else None
        except KdqError:
            command = None
    if "quantized.json" in names:
        return "int8", command
    if "packed.json" in names:
        return "lowbit", command
    if names & {WEIGHTS, MODEL_META}:
        return "float", command
    if command in _KIND_OF_COMMAND:
        return _KIND_OF_COMMAND[command], command
    subdirs = [run_dir / n for n in names if (run_dir / n).is_dir()]
    if names & {"summary.json", "summary.md"} or any((d / "stage.json").is_file() for d in subdirs):
        return "experiment", "run"
    if "sweep.md" in names or any(re.fullmatch(r"seed\d+", d.name) or (d / "packed.json").is_file() for d in subdirs):
        return "recipe", "recipe"
    return None, None


def _check_out_path(out: Path) -> None:
    """--out must be a folder (or not exist yet), and lie in folders."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == out else f"lies inside the file {path}"
            raise KdqError(f"--out {out} {where}; give a folder to write the run into")


def _foreign(out: Path) -> list[str]:
    """Names in `out` that kdq did not write (hidden files aside)."""
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []


def check_claim(out: str | Path, kind: str, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise the KdqError `claim` would, without writing or locking anything (a check of a
    later stage's directory before earlier stages run)."""
    _check_out_path(Path(out))
    _check_claim(Path(out), kind, resume, overwrite, None)


def _check_claim(out: Path, kind: str, resume: bool, overwrite: bool, record: dict[str, Any] | None) -> RunState:
    state = run_state(out)
    if state.kind is None:
        foreign = _foreign(out)
        if kind == "experiment":  # a folder of other runs may hold an experiment's stages beside them
            foreign = [n for n in foreign if not ((out / n).is_dir() and run_state(out / n).kind is not None)]
        if foreign:
            raise KdqError(f"{out} is a folder with files kdq did not write ({foreign[0]}...); "
                           "write the run to a new or empty folder")
        return state
    made_by = f" (made by `kdq {state.command}`)" if state.command else ""
    if overwrite and state.kind == "experiment" and kind != "experiment":
        raise KdqError(f"{out} holds an experiment{made_by}; kdq does not overwrite a folder of runs: "
                       "delete it yourself or write to another --out")
    if overwrite:
        return state
    if state.kind != kind:
        raise KdqError(f"{out} holds {_article(state.kind)} {state.kind} run{made_by}, not {_article(kind)} {kind} one; "
                       "write to another --out, or replace that run with --overwrite")
    if resume:
        if record is not None:
            check_resume(out, record)
        return state
    if state.status == "finished":
        raise KdqError(f"{out} holds a finished {kind} run{made_by}; continue it with --resume, "
                       "replace it with --overwrite, or write to another --out")
    raise KdqError(f"{out} holds an interrupted {kind} run{made_by}; continue it with --resume, "
                   "or start again with --overwrite")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def check_resume(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Refuse to resume `run_dir` with a config record that differs from its config.yaml
    (model, optimizer, learning rate, data...); RESUME_MAY_CHANGE options may differ."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists():
        return  # interrupted before config.yaml was written: nothing to compare with
    from kdq.io import read_yaml

    saved = read_yaml(run_dir / CONFIG)
    new = yaml.safe_load(yaml.safe_dump(record, sort_keys=False))  # as it would be saved
    diff = _difference(saved if isinstance(saved, dict) else {}, new, "")
    if diff is not None:
        key, old, given = diff
        show = lambda v: "(none)" if v is _MISSING else repr(v)[:60]  # noqa: E731
        raise KdqError(f"{run_dir} was started with {key} {show(old)} (its {CONFIG}), not {show(given)}; "
                       "--resume continues a run with the same model, optimizer and data: give the same options, "
                       "start again with --overwrite, or write to another --out")


_MISSING = object()


def _may_change(key: str) -> bool:
    parts = key.split(".")
    if parts[0] in ("train", "phases") and parts[-1] in RESUME_MAY_CHANGE:
        return True
    return len(parts) == 2 and parts[0] == "data" and parts[1] in _RESUME_MAY_CHANGE_DATA


def _difference(old: Any, new: Any, key: str) -> tuple[str, Any, Any] | None:
    """The first (dotted key, old, new) where two config records differ, allowed changes aside."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in dict.fromkeys([*old, *new]):
            sub = f"{key}.{k}" if key else str(k)
            found = _difference(old.get(k, _MISSING), new.get(k, _MISSING), sub)
            if found is not None:
                return found
        return None
    if old == new or _may_change(key):
        return None
    return key, old, new


def _open_lock(out: Path, create: bool) -> int | None:
    """An fd holding the flock on out/.kdq.lock (None: no lock file and not `create`).

    flock is released by the OS when the process ends in any way, kill -9 included, so a
    crashed run never leaves its directory locked.
    """
    import fcntl

    path = out / LOCK_FILE
    if not create and not path.exists():
        return None
    try:
        if create:
            out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KdqError(f"cannot write {out}: {exc.strerror or exc}; check the folder's permissions or choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise KdqError(f"{out} is in use by another kdq process (pid {pid}); wait for it to finish "
                       "or write to another --out") from None
    return fd


def clear_run(run_dir: str | Path) -> None:
    """Remove what kdq wrote in `run_dir`: RUN_FILES, eval-* files, qkd phases and sub-runs."""
    import re
    import shutil

    run_dir = Path(run_dir)
    for entry in run_dir.iterdir():
        name = entry.name
        if entry.is_symlink() or not entry.is_dir():
            if name in RUN_FILES or name.startswith(EVAL_PREFIX) or re.fullmatch(r"\..+\.tmp", name):
                entry.unlink(missing_ok=True)
        elif name in PHASE_DIRS or re.fullmatch(r"seed\d+", name) or (entry / RUN_FILE).exists() \
                or _infer_kind(entry, {p.name for p in entry.iterdir()})[0] is not None:
            shutil.rmtree(entry)


@contextmanager
def claim(out: str | Path, kind: str, command: str, *, resume: bool = False, overwrite: bool = False,
          record: dict[str, Any] | None = None) -> Iterator[Path]:
    """Hold `out` as this command's run directory of `kind` for the block's duration.

    Refused in one KdqError line, before anything is written, when `out` is a file or lies inside
    one; when it is a non-empty folder kdq did not write; when it holds a run of another kind
    (unless `overwrite`); when it holds a run, finished or interrupted, and neither `resume` nor
    `overwrite` is given; when `resume` meets a `record` that differs from the saved config.yaml
    (see check_resume); and when another process holds it. Then `overwrite` removes the old
    run's files (clear_run), and run.json records kind, command and status "running",
    "finished" once the block ends cleanly. A KdqError inside the block of a new single run
    removes what the block wrote unless it saved a checkpoint. The lock is released on any
    exit. This process may claim a directory it holds again (a command calling another):
    the inner claim only checks `record`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out = Path(out)
    key = Path(os.path.abspath(out))
    if key in _HELD:
        if resume and record is not None:
            check_resume(out, record)
        _HELD[key] += 1
        try:
            yield out
        finally:
            _HELD[key] -= 1
        return
    _check_out_path(out)
    created = not out.exists()
    lock = _open_lock(out, create=False)
    try:
        state = _check_claim(out, kind, resume, overwrite, record)
        if lock is None:
            lock = _open_lock(out, create=True)
            state = _check_claim(out, kind, resume, overwrite, record)  # another process may have been quicker
        os.ftruncate(lock, 0)  # the pid, for the message another process gets
        os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
        fresh = state.kind is None or overwrite
        if overwrite and state.kind is not None:
            clear_run(out)
        write_json(out / RUN_FILE, {"kind": kind, "command": command, "status": "running"})
        _HELD[key] = 1
        try:
            yield out
        except KdqError:
            # a new run stopped by a bad argument found late: leave nothing half-made, unless
            # training already saved a checkpoint to resume from (a folder of runs keeps its runs)
            if fresh and kind not in ("recipe", "experiment") and not (out / "checkpoint.pt").exists():
                clear_run(out)
            raise
        write_json(out / RUN_FILE, {"kind": kind, "command": command, "status": "finished"})
    finally:
        _HELD.pop(key, None)
        if lock is not None:
            os.close(lock)  # releases the flock
            if created and out.is_dir() and _foreign(out) == []:
                (out / LOCK_FILE).unlink(missing_ok=True)
                with suppress(OSError):
                    out.rmdir()
