"""What sparsity saves on disk: a pruned float model stored as bitmasks plus nonzero values.

    save_sparse("runs/pruned", model, data_meta)   # model.sparse.safetensors + sparse.json
    model = load_sparse("runs/pruned")             # the dense model, outputs identical

Each float32 tensor of the state is stored one of two ways, whichever is smaller:

- "bitmask": `KEY::mask`, one bit per element saying whether it is nonzero, packed 8 to a byte
  (uint8, ceil(numel / 8) bytes), and `KEY::values`, the nonzero elements in row-major order
  (float32). Bit i of the mask is bit i % 8 (least significant first) of byte i // 8, the
  order of NumPy's `packbits(bitorder="little")`; the last byte's spare bits are 0. An element
  costs 1 bit plus 4 bytes if nonzero: against 4 bytes dense, smaller from about 3% sparsity
  on, and at 90% sparsity 0.525 bytes an element, 7.6x smaller.
- "dense": the tensor as it is (biases, batch norm, any tensor with few zeros).

sparse.json, written last, holds each tensor's shape, dtype and encoding, the model's spec (how
kdq.models.create_model rebuilds it) and the data description. Loading rebuilds the dense model
and loads the decoded state: nothing is unpickled, and every size in the manifest is checked
against the stored bytes before a tensor is built. The loaded model runs dense kernels, no
faster than before pruning (see kdq.prune.magnitude).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdq.errors import KdqError, short_repr
from kdq.io import load_weights, read_json, save_weights, write_json
from kdq.models import create_model
from kdq.models.registry import check_registered
from kdq.prune.magnitude import Magnitude, effective_state, prune_magnitude, sparsity_of
from kdq.rundir.layout import SPARSE_MANIFEST as MANIFEST, SPARSE_TENSORS as TENSORS, WEIGHTS
from kdq.schema import DAMAGED, Checker

FORMAT = "kdq-sparse"
ENCODINGS = ("bitmask", "dense")
MAX_TENSOR_ELEMENTS = 1 << 31  # one tensor; a mask's stored bytes are checked against its count too
# Allow-list: a manifest names only these dtypes, never an arbitrary attribute of torch.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
          "uint8": torch.uint8, "bool": torch.bool}
# What one more tensor adds to the safetensors header (its name, dtype, shape, offsets): tensors
# too small to gain this much stay dense.
_HEADER_BYTES = 96
_BYTE_BITS = torch.arange(8, dtype=torch.uint8)
DEFAULT_SPARSITIES = (0.5, 0.75, 0.9, 0.95, 0.98)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor (any shape, read row-major) as a flat uint8 tensor, 8 elements a byte."""
    flat = mask.detach().reshape(-1).to(torch.uint8).cpu()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.reshape(-1, 8) << _BYTE_BITS).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first `numel` elements of a `pack_mask` result, as a flat bool tensor; a KdqError
    unless it is exactly ceil(numel / 8) uint8 bytes with the last byte's spare bits 0."""
    need = (numel + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise KdqError(f"a mask of {numel} elements takes {need} uint8 bytes, got {packed.numel()} "
                       f"{_dtype_name(packed.dtype)} values of shape {list(packed.shape)}")
    bits = ((packed[:, None] >> _BYTE_BITS) & 1).reshape(-1).bool()
    if bits[numel:].any():
        raise KdqError(f"a mask of {numel} elements has bits set past its end")
    return bits[:numel]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors to store, manifest entries): each float32 tensor as a bitmask and its nonzero
    values where that takes fewer bytes, every other tensor as it is."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for key, value in state.items():
        value = value.detach().cpu()
        name = _dtype_name(value.dtype)
        if "::" in key or name not in DTYPES:
            raise KdqError(f"cannot store state {key!r} ({name}) in a sparse file; save the model with kdq.save_model")
        entry = {"encoding": "dense", "shape": list(value.shape), "dtype": name}
        if value.dtype == torch.float32:
            nonzero = value != 0
            count = int(nonzero.sum())
            sparse_bytes = (value.numel() + 7) // 8 + 4 * count + _HEADER_BYTES
            if sparse_bytes < 4 * value.numel():
                tensors[f"{key}::mask"] = pack_mask(nonzero)
                tensors[f"{key}::values"] = value[nonzero].contiguous()  # row-major, as the mask's bits
                entries[key] = {**entry, "encoding": "bitmask"}
                continue
        tensors[key] = value
        entries[key] = entry
    return tensors, entries


def save_sparse(run_dir: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write `model` (pruned, masked or made permanent) to `run_dir`: model.sparse.safetensors
    and sparse.json (written last: its presence marks a complete save).

    A zoo model (built by kdq.models.create_model) is rebuilt from its spec by load_sparse; a
    user's own module is saved with no spec and loaded with load_sparse(run_dir, module).
    `meta` is the data description (kdq.rundir.load.data_meta) and any other JSON data.
    """
    spec = getattr(model, "kdq_spec", None)
    tensors, entries = encode_state(effective_state(model))
    out = Path(run_dir)
    save_weights(out / TENSORS, tensors)
    manifest = {"format": FORMAT, "version": 1, "spec": spec or None, "tensors": entries,
                "sparsity": sparsity_of(model)["sparsity"], "meta": meta or {}}
    write_json(out / MANIFEST, manifest)
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """sparse.json, checked (keys, types, shapes within limits) before anything is built from it."""
    manifest = read_json(path, expect=dict)
    if manifest.get("format") != FORMAT:
        raise KdqError(f"{path}: not a sparse kdq model (format {short_repr(manifest.get('format'))}); {DAMAGED}")
    check = Checker(path)
    check.integer(check.key(manifest, "version"), "version", 1, 1)
    spec = check.key(manifest, "spec")
    if spec is not None:  # None: a user's own module, loaded with module=
        check.model_spec(spec, "spec")
    for key, entry in check.mapping(check.key(manifest, "tensors"), "tensors").items():
        where = f"tensors[{short_repr(key)}]"
        entry = check.mapping(entry, where)
        check.expect("::" not in key, key, where, "a state key without '::'")
        encoding = check.string(check.key(entry, "encoding", where), f"{where}.encoding", ENCODINGS)
        check.shape(check.key(entry, "shape", where), f"{where}.shape", dims=(0, 8), max_dim=MAX_TENSOR_ELEMENTS,
                    max_elements=MAX_TENSOR_ELEMENTS)
        dtype = check.string(check.key(entry, "dtype", where), f"{where}.dtype", tuple(DTYPES))
        if encoding == "bitmask":
            check.expect(dtype == "float32", dtype, f"{where}.dtype", "float32 (the only dtype stored as a bitmask)")
    check.number(check.key(manifest, "sparsity", default=0.0), "sparsity")
    meta = check.mapping(check.key(manifest, "meta", default={}), "meta")
    check.data_fields(meta, "meta", required=False)
    return manifest


def decode_state(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """The dense state a checked manifest and its stored tensors describe.

    Every stored tensor must be one the manifest names, with the dtype and size it says: a
    mask of ceil(numel / 8) bytes with no bits set past numel, and as many values as it has
    bits set. Any mismatch is one KdqError naming `source`.
    """
    def fail(problem: str) -> KdqError:
        return KdqError(f"{source}: {problem}; {DAMAGED}")

    expected = set()
    state: dict[str, torch.Tensor] = {}
    for key, entry in manifest["tensors"].items():
        shape, dtype = entry["shape"], DTYPES[entry["dtype"]]
        numel = 1
        for size in shape:
            numel *= size
        if entry["encoding"] == "dense":
            expected.add(key)
            value = tensors.get(key)
            if value is None or value.dtype != dtype or list(value.shape) != shape:
                got = "missing" if value is None else f"{_dtype_name(value.dtype)} of shape {list(value.shape)}"
                raise fail(f"{key} should be {entry['dtype']} of shape {shape}, got {got}")
            state[key] = value
            continue
        expected |= {f"{key}::mask", f"{key}::values"}
        mask, values = tensors.get(f"{key}::mask"), tensors.get(f"{key}::values")
        if mask is None or values is None:
            raise fail(f"{key}::mask and {key}::values should both be stored")
        try:
            nonzero = unpack_mask(mask, numel)
        except KdqError as exc:
            raise fail(f"{key}::mask: {exc}") from None
        count = int(nonzero.sum())
        if values.dtype != torch.float32 or values.dim() != 1 or values.numel() != count:
            raise fail(f"{key}::values should be {count} float32 values (the bits set in its mask), "
                       f"got {values.numel()} {_dtype_name(values.dtype)} values of shape {list(values.shape)}")
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[nonzero] = values
        state[key] = dense.reshape(shape)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise fail(f"it stores tensors its manifest does not name ({', '.join(extra[:3])})")
    return state


def load_sparse(run_dir: str | Path, module: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by `save_sparse` (its zoo spec, or `module` for a user's own), with
    its dense weights; its outputs equal the saved model's. Nothing is unpickled."""
    path = Path(run_dir)
    if not (path / MANIFEST).exists() or not (path / TENSORS).exists():
        raise KdqError(f"{path} holds no sparse model ({MANIFEST} and {TENSORS} expected)")
    manifest = read_manifest(path / MANIFEST)
    spec = manifest["spec"]
    if module is None:
        if spec is None:
            raise KdqError(f"{path} holds a custom model built without kdq.models.create_model; load it in Python "
                           "with kdq.prune.load_sparse(path, module=YourModel())")
        check_registered(spec["name"], str(path))
    state = decode_state(manifest, load_weights(path / TENSORS), path / TENSORS)
    model = create_model(**spec) if module is None else module
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise KdqError(f"{path / TENSORS} does not fit the model its manifest describes ({first}); {DAMAGED}") from None
    return model


def sparse_sizes(model: nn.Module, sparsities: tuple[float, ...] = DEFAULT_SPARSITIES,
                 scope: str = "global") -> list[dict[str, Any]]:
    """Bytes on disk of `model` pruned (a copy, by magnitude, `scope`) at each sparsity: the
    dense safetensors file kdq writes for a float run against the sparse one, both written to
    a temporary folder and measured. One row per sparsity: sparsity (asked, and measured over
    the conv and linear weights), dense_bytes, sparse_bytes (the tensors file), manifest_bytes
    (sparse.json) and ratio (dense over sparse tensors)."""
    rows = []
    for sparsity in sparsities:
        pruned = copy.deepcopy(model).cpu()
        measured = prune_magnitude(pruned, Magnitude(sparsity, scope))["sparsity"]
        with tempfile.TemporaryDirectory() as tmp:
            dense = save_weights(Path(tmp) / WEIGHTS, pruned.state_dict()).stat().st_size
            out = save_sparse(Path(tmp) / "sparse", pruned)
            sparse, manifest = (out / TENSORS).stat().st_size, (out / MANIFEST).stat().st_size
        rows.append({"sparsity": sparsity, "measured_sparsity": measured, "dense_bytes": dense,
                     "sparse_bytes": sparse, "manifest_bytes": manifest, "ratio": dense / sparse})
    return rows
