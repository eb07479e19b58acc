"""Atomic file writes, and reads of untrusted files that fail as one KdqError line naming the file."""

from __future__ import annotations

import errno
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from kdq.errors import KdqError, short_repr
from kdq.schema import DAMAGED

MAX_JSON_BYTES = 64 << 20  # metadata, results and configs are kilobytes; refuse before reading more


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once (the only portable way to read it)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a written file follows the umask
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, read-only, no permission: the file named is the one meant
            fix = "free space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions"
            raise KdqError(f"cannot write {path}: {exc.strerror or exc}; {fix} or choose another --out") from None
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def read_text(path: str | Path, *, limit: int = MAX_JSON_BYTES, fix: str = DAMAGED) -> str:
    """A UTF-8 text file of at most `limit` bytes; any failure is a KdqError naming the file and `fix`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)  # never more than the cap, whatever the file's size
    except OSError as exc:
        raise KdqError(f"cannot read {path}: {exc.strerror or exc}; {fix}") from None
    if len(raw) > limit:
        raise KdqError(f"{path} is larger than {limit >> 20} MB, too large for a kdq file; {fix}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KdqError(f"{path} is not UTF-8 text (byte {exc.start}); {fix}") from None


def read_json(path: str | Path, *, fix: str = DAMAGED, expect: type | None = None) -> Any:
    """Parse a JSON file (optionally checked to be an `expect`, e.g. dict); failures are one KdqError line."""
    path = Path(path)
    text = read_text(path, fix=fix)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise KdqError(f"{path} is not valid JSON ({_reason(exc)}); {fix}") from None
    if expect is not None and not isinstance(value, expect):
        kind = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise KdqError(f"{path} must hold {kind}, got {short_repr(value)}; {fix}")
    return value


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line; flushed and fsynced so a crash loses at most the line being written."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors (no pickle); shared storage is copied apart first.

    `metadata` (strings only, a safetensors rule) goes into the file's header.
    """
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _reason(exc: BaseException, limit: int = 100) -> str:
    """The first line of a library's error message, cut to `limit` characters."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _damaged(path: str | Path, exc: BaseException, fix: str) -> KdqError:
    return KdqError(f"{path} is damaged or not a kdq file ({_reason(exc)}); {fix}")


def _check_safetensors(path: Path, fix: str) -> None:
    """The header's declared length fits the file (safetensors itself checks each tensor's offsets)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise KdqError(f"cannot read {path}: {exc.strerror or exc}; {fix}") from None
    header = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 2 <= header <= min(size - 8, MAX_JSON_BYTES):
        raise KdqError(f"{path} is truncated or not a safetensors file ({size} bytes); {fix}")


def load_weights(path: str | Path, *, fix: str = DAMAGED) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or foreign file is one KdqError line."""
    _check_safetensors(Path(path), fix)
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ValueError... for a bad file
        raise _damaged(path, exc, fix) from None


def weights_metadata(path: str | Path, *, fix: str = DAMAGED) -> dict[str, str]:
    """The string metadata in a safetensors header (empty when it has none)."""
    from safetensors import safe_open

    _check_safetensors(Path(path), fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - as in load_weights
        raise _damaged(path, exc, fix) from None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """A resumable training state (optimizer, schedule, RNG); read back with weights_only=True."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, *, fix: str = DAMAGED) -> dict[str, Any]:
    """A training state saved by `save_checkpoint`: weights_only, so nothing but tensors and plain data."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text suggests weights_only=False: never for a file that may be hostile
        raise KdqError(f"{path} is damaged or not a kdq checkpoint (it holds something other than "
                       f"tensors and plain values); {fix}") from None
    except EOFError:
        raise KdqError(f"{path} is empty or truncated; {fix}") from None
    except Exception as exc:  # noqa: BLE001 - RuntimeError, OSError, zip errors... for a bad file
        raise _damaged(path, exc, fix) from None
    if not isinstance(state, dict):
        raise KdqError(f"{path} is not a kdq checkpoint (it holds {type(state).__name__}); {fix}")
    return state


MAX_YAML_BYTES = 4 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000  # counted with every alias expanded: a "billion laughs" document fails here


class _YamlLimit(yaml.YAMLError):
    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that refuses deep nesting and documents whose aliases expand to many nodes,
    while composing: before anything is constructed, so nothing is ever expanded."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise _YamlLimit("an alias refers to a node that contains it (a recursive document)", mark)
            return node
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _YamlLimit(f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        size = 1 + sum(self._sizes.get(id(c), 1) for c in children)
        if size > MAX_YAML_NODES:
            raise _YamlLimit(f"expands to more than {MAX_YAML_NODES:,} values (too many aliases)", mark)
        self._sizes[id(node)] = size
        return node


def parse_yaml(text: str, source: str | Path, fix: str = "") -> Any:
    """Parse YAML safely (no tags, nesting and alias expansion capped); errors are one KdqError line."""
    loader = _LimitedLoader(text)
    try:
        return loader.get_single_data()
    except (yaml.YAMLError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise KdqError(f"{source} is not valid YAML{where}: {problem}{'; ' + fix if fix else ''}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, *, fix: str = DAMAGED) -> Any:
    """A YAML file through `read_text` (size cap, UTF-8) and `parse_yaml`."""
    return parse_yaml(read_text(path, limit=MAX_YAML_BYTES, fix=fix), path, fix)
