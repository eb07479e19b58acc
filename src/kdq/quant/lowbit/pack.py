"""Real low-bit storage: bit-packed weight codes in safetensors, everything else as JSON.

A k-bit weight takes ceil(numel * k / 8) bytes plus its scales: about k/32 of float32.
Bit layout: code i occupies bits [i*k, (i+1)*k) of one little-endian bit stream, least
significant bit first, and bit j of the stream is bit j % 8 of byte j // 8 (NumPy's
`packbits(bitorder="little")` order). The last byte is padded with zeros.

`save_packed` stores only the codes of quantized weights, not their latent float values;
`load_packed` rebuilds the zoo model, redoes `quantize_lowbit` from the recorded plan, loads
the other tensors (biases, batch norm, activation quantizer state) and freezes each quantized weight
at its dequantized codes, so the loaded model's eval outputs equal the original's exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdq.errors import KdqError
from kdq.io import load_weights, read_json, save_weights, weights_metadata, write_json
from kdq.models import create_model
from kdq.models.registry import check_registered
from kdq.quant.lowbit.layers import lowbit_layers, rebuild_lowbit
from kdq.quant.lowbit.quantizers import MAX_BITS, QuantCodes, check_bits
from kdq.rundir.layout import PACKED_MANIFEST as MANIFEST, PACKED_TENSORS as TENSORS
from kdq.schema import DAMAGED, Checker

FILE_KEY = "kdq_packed"  # header key of the manifest in a single-file export
FORMAT = "kdq-lowbit"
# Codes handled per step: a multiple of 8, so every step but the last fills whole bytes, and
# small enough that the (codes x bits) intermediate stays a few MB for any model.
_CHUNK = 1 << 16
MAX_WEIGHT_ELEMENTS = 1 << 31  # one weight tensor; its stored bytes are checked against this count too


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take once packed."""
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2**bits), any shape, as a flat uint8 tensor of packed bits."""
    bits = check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise KdqError(f"pack_codes needs an integer tensor of codes, got {codes.dtype}")
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise KdqError(f"{bits}-bit codes must lie in [0, {1 << bits}), got values from {int(flat.min())} to {int(flat.max())}")
    shifts = torch.arange(bits, device=flat.device)
    byte_bits = torch.arange(8, device=flat.device)
    out = []
    for start in range(0, flat.numel(), _CHUNK):
        stream = ((flat[start : start + _CHUNK, None] >> shifts) & 1).reshape(-1)
        stream = F.pad(stream, (0, -stream.numel() % 8))
        out.append((stream.reshape(-1, 8) << byte_bits).sum(1).to(torch.uint8))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8, device=flat.device)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first `numel` codes of `bits` bits from `pack_codes`' output, as a flat int64 tensor."""
    bits = check_bits(bits)
    need = packed_nbytes(numel, bits)
    if packed.dtype != torch.uint8 or packed.numel() != need:
        raise KdqError(f"packed codes should be {need} uint8 bytes for {numel} codes of {bits} bits, got {packed.numel()} {packed.dtype} values")
    flat = packed.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, device=flat.device)
    byte_bits = torch.arange(8, device=flat.device)
    out = []
    chunk_bytes = _CHUNK * bits // 8
    for i, start in enumerate(range(0, flat.numel(), chunk_bytes)):
        count = min(_CHUNK, numel - i * _CHUNK)
        stream = ((flat[start : start + chunk_bytes, None] >> byte_bits) & 1).reshape(-1)
        out.append((stream[: count * bits].reshape(count, bits) << shifts).sum(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=flat.device)


# ---- whole models


def save_packed(model: nn.Module, path_dir: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write a `quantize_lowbit` zoo model to `path_dir`: packed.safetensors + packed.json.

    Quantized weights are stored as packed codes with their scale and zero point (or lookup
    table); every other parameter and buffer (biases, batch norm, activation quantizer state
    such as LSQ step sizes and ranges) as float tensors. A packed weight's own quantizer state
    and batch norm's batch counters are left out: inference never reads them, and a weight
    unfrozen for more training re-initialises its quantizer. `meta` is extra JSON data for the
    manifest. Both files are written atomically, the manifest last.
    """
    record = getattr(model, "kdq_lowbit", None)
    spec = getattr(model, "kdq_spec", None)
    if record is None:
        raise KdqError("save_packed needs a model made by quantize_lowbit (it has no kdq_lowbit record)")
    if not spec or not spec.get("name"):
        raise KdqError("save_packed needs a zoo model built by create_model (it has no kdq_spec to rebuild it from)")
    tensors: dict[str, torch.Tensor] = {}
    weights: dict[str, dict[str, Any]] = {}
    for name, layer in lowbit_layers(model).items():
        if layer.weight_quantizer is None and layer.weight_codes is None:
            continue  # a float weight: saved below with the other tensors
        key = f"{name}.weight" if name else "weight"
        codes = layer.export_weight()
        tensors[f"{key}::codes"] = pack_codes(codes.codes, codes.bits)
        if codes.kind == "lookup":
            tensors[f"{key}::levels"] = codes.levels
        else:
            tensors[f"{key}::scale"] = codes.scale
            tensors[f"{key}::zero_point"] = codes.zero_point
        weights[key] = {"bits": codes.bits, "shape": list(codes.codes.shape), "dequant": codes.kind}
    for key, value in model.state_dict().items():
        if key not in weights and not _needless(key, weights):
            tensors[key] = value
    out = Path(path_dir)
    save_weights(out / TENSORS, tensors)
    manifest = {"format": FORMAT, "version": 1, "spec": spec, "lowbit": record, "weights": weights, "meta": meta or {}}
    write_json(out / MANIFEST, manifest)  # written last: its presence marks a complete save
    return out


def _needless(key: str, packed: dict[str, Any]) -> bool:
    """State a deployed model never reads: the quantizer of a packed weight (its codes carry
    the scale) and batch norm's batch counter (momentum-based BN ignores it)."""
    layer, sep, _ = key.partition(".weight_quantizer.")
    return key.endswith("num_batches_tracked") or (bool(sep) and f"{layer}.weight" in packed)


def export_packed_file(path_dir: str | Path, out: str | Path) -> Path:
    """One self-contained file from a `save_packed` directory: the tensors, manifest in the header."""
    manifest, tensors = _read(Path(path_dir))
    return save_weights(out, tensors, metadata={FILE_KEY: json.dumps(manifest)})


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest and tensors of a packed directory or of a single exported file."""
    if path.is_file():
        fix = "export it again with `kdq export RUN --format packed`"
        try:
            manifest = json.loads(weights_metadata(path, fix=fix).get(FILE_KEY, "null"))
        except (ValueError, RecursionError):
            manifest = None
        where = path
    else:
        if not (path / MANIFEST).exists() or not (path / TENSORS).exists():
            raise KdqError(f"{path} holds no packed low-bit model ({MANIFEST} and {TENSORS} expected)")
        manifest, where = read_json(path / MANIFEST), path / MANIFEST
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KdqError(f"{where}: not a packed low-bit kdq model; export one with `kdq export RUN --format packed`")
    check_manifest(manifest, where)
    return manifest, load_weights(path if path.is_file() else path / TENSORS)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """packed.json, checked (keys, types, shape sizes) before anything is built from it."""
    manifest = read_json(path, expect=dict)
    if manifest.get("format") != FORMAT:
        raise KdqError(f"{path}: not a packed low-bit kdq model; export one with `kdq export RUN --format packed`")
    return check_manifest(manifest, path)


def check_manifest(manifest: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """The keys and types `load_packed` reads; a weight's shape is checked as integers within
    limits before its element count is computed (a shape of ["x", 1e5, 1e5] builds nothing)."""
    check = Checker(where)
    check.model_spec(check.key(manifest, "spec"), "spec")
    record = check.mapping(check.key(manifest, "lowbit"), "lowbit")
    check.mapping(check.key(record, "layers", "lowbit"), "lowbit.layers")
    for key, entry in check.mapping(check.key(manifest, "weights"), "weights").items():
        path = f"weights[{key!r}]"
        entry = check.mapping(entry, path)
        check.integer(check.key(entry, "bits", path), f"{path}.bits", 1, MAX_BITS)
        check.shape(check.key(entry, "shape", path), f"{path}.shape", dims=(1, 8), max_dim=MAX_WEIGHT_ELEMENTS,
                    max_elements=MAX_WEIGHT_ELEMENTS)
        check.string(check.key(entry, "dequant", path), f"{path}.dequant", ("affine", "lookup"))
    meta = check.mapping(check.key(manifest, "meta", default={}), "meta")
    check.data_fields(meta, "meta", required=False)
    return manifest


def load_packed(path_dir: str | Path) -> nn.Module:
    """Rebuild a model saved by `save_packed` (a directory, or its single-file export), in eval mode.

    Nothing is unpickled.

    Quantized weights are frozen at their stored values (`unfreeze_weight` on a layer resumes
    quantization-aware training from them); its eval outputs equal the saved model's.
    """
    path = Path(path_dir)
    manifest, tensors = _read(path)
    try:
        return _load(path, manifest, tensors)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
        # a well-formed manifest whose tensors have other shapes than the model it describes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise KdqError(f"{path}: the stored tensors do not fit the model its manifest describes ({first}); {DAMAGED}") from None


def _load(path: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    check_registered(manifest["spec"]["name"], str(path))
    model = rebuild_lowbit(create_model(**manifest["spec"]), manifest["lowbit"])
    layers = lowbit_layers(model)
    state = {k: v for k, v in tensors.items() if "::" not in k}
    result = model.load_state_dict(state, strict=False)
    missing = {k for k in result.missing_keys if not _needless(k, manifest["weights"])}
    if result.unexpected_keys or missing != set(manifest["weights"]):
        extra = sorted(result.unexpected_keys) or sorted(missing ^ set(manifest["weights"]))
        raise KdqError(f"{path / TENSORS} does not match the model its manifest describes (first mismatched tensors: {', '.join(extra[:3])})")
    for key, entry in manifest["weights"].items():
        layer = layers.get(key.removesuffix("weight").removesuffix("."))
        if layer is None:
            raise KdqError(f"{path / MANIFEST}: packed weight {key!r} is not a low-bit layer of the rebuilt model")
        try:
            codes = _codes(key, entry, tensors)
        except KdqError as exc:  # name the file: the same weight may come from a directory or an export
            raise KdqError(f"{path if path.is_file() else path / TENSORS}: {key}: {exc}; {DAMAGED}") from None
        layer.freeze_weight(codes)
    return model.eval()


def _codes(key: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QuantCodes:
    """The QuantCodes of one packed weight, from its manifest entry and stored tensors."""
    bits, shape, kind = check_bits(entry.get("bits")), entry.get("shape"), entry.get("dequant")
    parts = ("codes", "levels") if kind == "lookup" else ("codes", "scale", "zero_point")
    if kind not in ("affine", "lookup") or not isinstance(shape, list):
        raise KdqError(f"{MANIFEST}: bad entry for {key!r}: dequant must be affine or lookup and shape a list")
    missing = [p for p in parts if f"{key}::{p}" not in tensors]
    if missing:
        raise KdqError(f"{TENSORS} lacks {', '.join(f'{key}::{p}' for p in missing)}")
    numel = 1
    for size in shape:
        numel *= size
    codes = unpack_codes(tensors[f"{key}::codes"], bits, numel).reshape(shape)
    if kind == "lookup":
        return QuantCodes(codes, bits, levels=tensors[f"{key}::levels"])
    return QuantCodes(codes, bits, tensors[f"{key}::scale"], tensors[f"{key}::zero_point"])
