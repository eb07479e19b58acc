"""A kdq ONNX file: the metadata it carries, and reading and writing it with every check.

Both the exporter and the ONNX Runtime wrapper use this module and neither imports the other
for it, so the deploy package has one direction: metadata <- ort <- onnx_export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from kdq.errors import KdqError
from kdq.io import atomic_write
from kdq.schema import Checker

META_KEY = "kdq"
# What a later `kdq evaluate model.onnx` needs to rebuild the data pipeline and name the classes.
META_FIELDS = ("classes", "mean", "std", "input_shape", "dataset", "architecture", "macs", "sparsity", "params")
PRECISIONS = ("float32", "int8")
MAX_ONNX_BYTES = 2 << 30


def kdq_metadata(meta: dict[str, Any], precision: str) -> dict[str, Any]:
    """The JSON stored under `metadata_props["kdq"]`: the model.json fields plus precision."""
    if precision not in PRECISIONS:
        raise KdqError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    missing = [k for k in ("classes", "mean", "std", "input_shape") if meta.get(k) is None]
    if missing:
        raise KdqError(f"ONNX export needs model metadata {', '.join(missing)}; pass the run's model.json as meta")
    out = {k: meta.get(k) for k in META_FIELDS}
    out["input_shape"] = list(out["input_shape"])
    out.update(precision=precision, producer="kdq")
    return out


def set_metadata(proto: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Replace any earlier kdq entry so a re-quantized file never carries two."""
    kept = [p for p in proto.metadata_props if p.key != META_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta))


def get_metadata(proto: onnx.ModelProto) -> dict[str, Any] | None:
    """The kdq entry of an ONNX model, or None when it has none (or an unreadable one)."""
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            try:
                value = json.loads(prop.value)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def check_metadata(meta: dict[str, Any], path: str | Path) -> None:
    """The kdq metadata an evaluation reads (classes, normalisation, input shape, precision)."""
    check = Checker(f"{path} (kdq metadata)", fix="export the run again with `kdq export`")
    check.data_fields(meta)
    check.key(meta, "dataset")  # evaluation without --data reads it (data_fields checked its type)
    check.string(check.key(meta, "precision"), "precision", PRECISIONS)
    if meta.get("architecture") is not None:  # informational only: nothing is built from it
        check.mapping(meta["architecture"], "architecture")
    # the source model's figures, carried into an evaluation's results (absent in older exports)
    for key in ("macs", "params"):
        if meta.get(key) is not None:
            check.integer(meta[key], key, 0, 1 << 62)
    if meta.get("sparsity") is not None:
        sparsity = check.number(meta["sparsity"], "sparsity")
        check.expect(0 <= sparsity <= 1, sparsity, "sparsity", "a fraction in [0, 1]")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (ONNX and ORT errors run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise KdqError(f"ONNX file {str(path)!r} not found; create it with `kdq export`")
    try:
        if path.stat().st_size > MAX_ONNX_BYTES:  # protobuf's own limit: nothing larger is an ONNX model
            raise KdqError(f"{path} is larger than 2 GB, too large for an ONNX model; export it again with `kdq export`")
        return path.read_bytes()
    except OSError as exc:
        raise KdqError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(data: bytes, path: str | Path) -> onnx.ModelProto:
    name = Path(path).name
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise KdqError(f"{name} is not a valid ONNX file ({first_line(exc)})") from None
    # Random bytes can decode as an almost-empty protobuf; a real model has a graph and IR version.
    if proto.ir_version == 0 or not proto.graph.node or not proto.graph.input:
        raise KdqError(f"{name} is not a valid ONNX file (no graph)")
    return proto


def read_onnx(path: str | Path) -> tuple[bytes, onnx.ModelProto, dict[str, Any]]:
    """The file's bytes (for an ORT session), its parsed model and its checked kdq metadata."""
    data = _read_bytes(path)
    proto = _parse(data, path)
    meta = get_metadata(proto)
    if meta is None:
        raise KdqError(f"{Path(path).name} is not a kdq export (no kdq metadata); export it with `kdq export`")
    check_metadata(meta, path)
    return data, proto, meta


def load_onnx(path: str | Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Parse an ONNX file and its kdq metadata; every failure is a one-line KdqError."""
    _, proto, meta = read_onnx(path)
    return proto, meta


def save_onnx(proto: onnx.ModelProto, path: str | Path) -> Path:
    """Write atomically, so an interrupted export never leaves half a model behind."""
    return atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))
