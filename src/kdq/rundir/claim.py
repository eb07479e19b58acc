"""Who is writing a run directory, and what kind of run it holds.

Every command that writes a run directory first calls `claim`: it refuses, in one line and
before anything is written, to mix runs of different kinds, to replace a finished run
unasked, to resume a run with other options, or to write where another process is writing.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from kdq.errors import KdqError
from kdq.io import read_json, read_yaml, write_json
from kdq.rundir.layout import (
    CHECKPOINT,
    CONFIG,
    EVAL_PREFIX,
    INT8_MANIFEST,
    KEPT_EPOCH,
    KINDS,
    LOCK_FILE,
    MODEL_META,
    PACKED_MANIFEST,
    PHASE_DIRS,
    RESULTS,
    ROUND_DIR,
    RUN_FILE,
    RUN_FILES,
    STAGE_FILE,
    SPARSE_MANIFEST,
    SUMMARY_JSON,
    SUMMARY_MD,
    SWEEP_MD,
    TENSORBOARD,
    WEIGHTS,
)

STATUSES = ("running", "finished")
# What each command's config.yaml "command" makes (for run directories written before run.json)
_KIND_OF_COMMAND = {"train": "float", "distill": "float", "quantize": "int8", "qat": "int8",
                    "qat-lowbit": "lowbit", "recipe": "lowbit"}
# A resumed run may change these training options (train longer, on another device); any other
# difference from its config.yaml (model, optimizer, lr, data...) is refused.
RESUME_MAY_CHANGE = ("epochs", "patience", "device", "progress", "eval_batch_size", "amp", "log", "log_every")
_RESUME_MAY_CHANGE_DATA = ("data_dir", "download")

_HELD: dict[Path, int] = {}  # run directories this process has claimed (nested claims are free)


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
    done = {"recipe": SWEEP_MD, "experiment": SUMMARY_JSON}.get(kind, RESULTS)
    return RunState(kind, "finished" if done in names else "running", command)


def _infer_kind(run_dir: Path, names: set[str]) -> tuple[str | None, str | None]:
    """(kind, command) of a run directory written before run.json existed."""
    command = None
    if CONFIG in names:
        try:
            config = read_yaml(run_dir / CONFIG)
            command = config.get("command") if isinstance(config, dict) else None
        except KdqError:
            command = None
    if INT8_MANIFEST in names:
        return "int8", command
    if PACKED_MANIFEST in names:
        return "lowbit", command
    if names & {WEIGHTS, MODEL_META, SPARSE_MANIFEST}:
        return "float", command
    if command in _KIND_OF_COMMAND:
        return _KIND_OF_COMMAND[command], command
    subdirs = [run_dir / n for n in names if (run_dir / n).is_dir()]
    if names & {SUMMARY_JSON, SUMMARY_MD} or any((d / STAGE_FILE).is_file() for d in subdirs):
        return "experiment", "run"
    if SWEEP_MD in names or any(re.fullmatch(r"seed\d+", d.name) or (d / PACKED_MANIFEST).is_file() for d in subdirs):
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
    """Remove what kdq wrote in `run_dir`: RUN_FILES, eval-* files, TensorBoard logs, qkd phases and
    sub-runs."""
    run_dir = Path(run_dir)
    for entry in run_dir.iterdir():
        name = entry.name
        if entry.is_symlink() or not entry.is_dir():
            if name in RUN_FILES or name.startswith(EVAL_PREFIX) or re.fullmatch(r"\..+\.tmp", name) \
                    or KEPT_EPOCH.fullmatch(name):
                entry.unlink(missing_ok=True)
        elif name in PHASE_DIRS or name == TENSORBOARD or re.fullmatch(r"seed\d+", name) or ROUND_DIR.fullmatch(name) \
                or (entry / RUN_FILE).exists() \
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
            if fresh and kind not in ("recipe", "experiment") and not (out / CHECKPOINT).exists():
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
