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
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from kdq.errors import KdqError

try:  # numpy >= 2 moved the module; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# Limits on what an IDX header may claim, checked before any data is read: the largest real
# file (EMNIST byclass training images) holds 698k samples in 0.55 GB.
MAX_IDX_SAMPLES = 10_000_000
MAX_IDX_SIDE = 4096
MAX_IDX_BYTES = 1 << 30


def _open(path: Path) -> BinaryIO:
    """The file for reading, gunzipped as it is read (never inflated whole) when named .gz."""
    f = open(path, "rb")
    if path.suffix != ".gz":
        return f
    magic = f.read(4)
    if magic[:2] != b"\x1f\x8b":
        f.close()
        raise KdqError(f"{path}: not a gzip file (starts with {magic.hex() or 'nothing'}); delete it and fetch it again")
    f.seek(0)
    return gzip.GzipFile(fileobj=f, mode="rb")


def read_idx(path: Path, ndim: int, check: Callable[[tuple[int, ...]], None] | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) holding an array of `ndim` dimensions.

    The header is read first and its sizes checked against limits (and by `check`, given the
    shape) before the data is read; then exactly that much data is read, and any data after
    it is refused: a small .gz that inflates to gigabytes is never inflated.
    """
    try:
        with _open(path) as f:
            return _read_idx(path, f, ndim, check)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        if path.suffix == ".gz":
            raise KdqError(f"{path}: damaged gzip file ({e}); delete it and fetch it again") from None
        raise KdqError(f"{path}: cannot read ({e.strerror if isinstance(e, OSError) else e}); fetch it again") from None


def _read_idx(path: Path, f: BinaryIO, ndim: int, check: Callable[[tuple[int, ...]], None] | None) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_DTYPES or magic[3] != ndim:
        expected = 0x0800 + ndim
        got = magic.hex() if len(magic) >= 4 else "a file of %d bytes" % len(magic)
        raise KdqError(f"{path}: not an IDX file with {ndim} dimension(s) (magic {got}, expected 0x{expected:08x})")
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise KdqError(f"{path}: truncated IDX header ({4 + len(dims)} bytes)")
    shape = tuple(int.from_bytes(dims[i : i + 4], "big") for i in range(0, 4 * ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[magic[2]])
    need = math.prod(shape) * dtype.itemsize  # python ints: a hostile header cannot overflow the check
    if shape[0] > MAX_IDX_SAMPLES or any(d > MAX_IDX_SIDE for d in shape[1:]) or need > MAX_IDX_BYTES:
        raise KdqError(f"{path}: header claims an array of {shape} ({need:,} bytes), beyond what kdq reads "
                       f"({MAX_IDX_SAMPLES:,} samples of at most {MAX_IDX_SIDE} per side, {MAX_IDX_BYTES >> 20} MB); "
                       "the file is damaged or not a data set, delete it and fetch it again")
    if check is not None:
        check(shape)
    data = f.read(need)
    if len(data) < need:
        raise KdqError(f"{path}: truncated: header says {shape} = {need} bytes of data, file has {len(data)}")
    if f.read(1):
        raise KdqError(f"{path}: more data than its header's {shape} ({need} bytes); "
                       "the file is damaged, delete it and fetch it again")
    return np.frombuffer(data, dtype, count=math.prod(shape)).reshape(shape)


def read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from two IDX files."""
    y = read_idx(labels, 1)

    def same_count(shape: tuple[int, ...]) -> None:  # before the images are read
        if shape[0] != len(y):
            raise KdqError(f"{images.name} holds {shape[0]} images but {labels.name} holds {len(y)} labels; "
                           "the files do not belong together")

    x = read_idx(images, 3, same_count)
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


MAX_CIFAR_MEMBER = 256 << 20  # one CIFAR batch is 31 MB


def _read_member(name: str | Path, size: int, read: Callable[[], bytes]) -> bytes:
    """A CIFAR file's bytes, once its stated size is known to be sane."""
    if size > MAX_CIFAR_MEMBER:
        raise KdqError(f"{name}: {size:,} bytes, more than a CIFAR batch holds ({MAX_CIFAR_MEMBER >> 20} MB); "
                       "delete it and fetch the archive again")
    return read()


def read_cifar_members(location: Path, folder: str, members: list[str]) -> dict[str, bytes]:
    """Raw bytes of `members` from an extracted CIFAR folder or the .tar.gz archive."""
    if location.is_dir():
        found = {m: _read_member(location / m, (location / m).stat().st_size, (location / m).read_bytes)
                 for m in members if (location / m).is_file()}
    else:
        found = {}
        wanted = {f"{folder}/{m}": m for m in members}
        try:
            with tarfile.open(location, "r:*") as tar:
                for info in tar:
                    if info.name in wanted and info.isfile():
                        found[wanted[info.name]] = _read_member(f"{location}/{info.name}", info.size,
                                                                tar.extractfile(info).read)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise KdqError(f"{location}: damaged CIFAR archive ({e}); delete it and fetch it again") from None
    missing = [m for m in members if m not in found]
    if missing:
        raise KdqError(f"{location}: CIFAR data incomplete, missing {', '.join(missing)}; fetch the archive again")
    return found
