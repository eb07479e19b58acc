"""Parsers for the on-disk formats: IDX (MNIST family) and the CIFAR python pickles.

Every way a file can be wrong ends in a one-line KdqError naming the file, so a bad
download never surfaces as a reshape error deep inside numpy.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from kdq.errors import KdqError

try:  # numpy >= 2 moved the module; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped when the name ends in .gz."""
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    if raw[:2] != b"\x1f\x8b":
        raise KdqError(f"{path}: not a gzip file (starts with {raw[:4].hex() or 'nothing'}); delete it and fetch it again")
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise KdqError(f"{path}: damaged gzip file ({e}); delete it and fetch it again") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) holding an array of `ndim` dimensions."""
    data = read_bytes(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES or data[3] != ndim:
        expected = 0x0800 + ndim
        got = data[:4].hex() if len(data) >= 4 else "a file of %d bytes" % len(data)
        raise KdqError(f"{path}: not an IDX file with {ndim} dimension(s) (magic {got}, expected 0x{expected:08x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise KdqError(f"{path}: truncated IDX header ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = math.prod(shape)  # python ints: a hostile header cannot overflow the check
    need = count * dtype.itemsize
    if len(data) - header < need:
        raise KdqError(f"{path}: truncated: header says {shape} = {need} bytes of data, file has {len(data) - header}")
    return np.frombuffer(data, dtype, count=count, offset=header).reshape(shape)


def read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from two IDX files."""
    x = read_idx(images, 3)
    y = read_idx(labels, 1)
    if len(x) != len(y):
        raise KdqError(f"{images.name} holds {len(x)} images but {labels.name} holds {len(y)} labels; the files do not belong together")
    return x.astype(np.uint8, copy=False)[:, None], y.astype(np.int64)


# The CIFAR batches are dicts of bytes, lists and ints plus one numpy array; rebuilding
# that array needs exactly these three globals. Anything else (os.system, ...) is refused.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def load_pickle(blob: bytes, source: str) -> Any:
    """Unpickle untrusted bytes allowing only plain data and numpy arrays."""
    try:
        return _RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # a hostile or damaged pickle can raise almost anything
        raise KdqError(f"{source}: not a CIFAR python pickle ({type(e).__name__}: {e})") from None


def parse_cifar_batch(blob: bytes, source: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one CIFAR batch pickle."""
    batch = load_pickle(blob, source)
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(label_key) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise KdqError(f"{source}: not a CIFAR batch (expected {{b'data': uint8 array (N, 3072)}})")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise KdqError(f"{source}: CIFAR batch has {len(data)} images but no matching {label_key.decode()} list")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def parse_cifar_names(blob: bytes, source: str, names_key: bytes) -> list[str]:
    """Class names from the CIFAR meta pickle."""
    meta = load_pickle(blob, source)
    names = meta.get(names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list):
        raise KdqError(f"{source}: CIFAR meta file has no {names_key.decode()} list")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_cifar_members(location: Path, folder: str, members: list[str]) -> dict[str, bytes]:
    """Raw bytes of `members` from an extracted CIFAR folder or the .tar.gz archive."""
    if location.is_dir():
        found = {m: (location / m).read_bytes() for m in members if (location / m).is_file()}
    else:
        found = {}
        wanted = {f"{folder}/{m}": m for m in members}
        try:
            with tarfile.open(location, "r:*") as tar:
                for info in tar:
                    if info.name in wanted and info.isfile():
                        found[wanted[info.name]] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise KdqError(f"{location}: damaged CIFAR archive ({e}); delete it and fetch it again") from None
    missing = [m for m in members if m not in found]
    if missing:
        raise KdqError(f"{location}: CIFAR data incomplete, missing {', '.join(missing)}; fetch the archive again")
    return found
