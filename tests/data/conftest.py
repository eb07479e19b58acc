"""Tiny data sets written in the real on-disk formats, and an environment with no real data."""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kdq.data import locate

MNIST_FILES = {
    "train-images-idx3-ubyte": "train_x", "train-labels-idx1-ubyte": "train_y",
    "t10k-images-idx3-ubyte": "test_x", "t10k-labels-idx1-ubyte": "test_y",
}


@pytest.fixture(autouse=True)
def no_real_data(tmp_path_factory, monkeypatch):
    """Every test starts with empty system folders and cache, no $KDQ_DATA and no proxy."""
    empty = tmp_path_factory.mktemp("nowhere")
    monkeypatch.setattr(locate, "SYSTEM_DIRS", {"fashion-mnist": [empty / "sys-fmnist"], "mnist": [empty / "sys-mnist"]})
    monkeypatch.setenv("XDG_CACHE_HOME", str(empty / "cache"))
    for var in ("KDQ_DATA", "KDQ_MIRROR", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return empty


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file holding a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def mnist_arrays(n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    return {
        "train_x": rng.randint(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train_y": np.arange(n_train) % 10,
        "test_x": rng.randint(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "test_y": (np.arange(n_test) * 3) % 10,
    }


def write_mnist(folder: Path, gz: bool = True, arrays: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The four MNIST IDX files in `folder`, gzipped or raw; returns the arrays written."""
    arrays = arrays or mnist_arrays()
    folder.mkdir(parents=True, exist_ok=True)
    for stem, key in MNIST_FILES.items():
        blob = idx_bytes(arrays[key])
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(blob) if gz else blob)
    return arrays


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes, the way the original CIFAR pickles were made."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj: object) -> bytes:
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # the originals were written by numpy 1.x, which lived at numpy.core
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz", classes=10,
                    train=[f"data_batch_{i}" for i in range(1, 6)], test="test_batch", meta="batches.meta",
                    label_key=b"labels", names_key=b"label_names"),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz", classes=100,
                     train=["train"], test="test", meta="meta",
                     label_key=b"fine_labels", names_key=b"fine_label_names"),
}


def cifar_members(name: str, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> tuple[dict[str, bytes], dict]:
    """Pickled batches and meta, like the originals; also the arrays that went in."""
    spec, rng = CIFAR[name], np.random.RandomState(seed)
    members, truth = {}, {"train_x": [], "train_y": []}
    for m in spec["train"] + [spec["test"]]:
        n = n_test if m == spec["test"] else per_batch
        data = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
        labels = list(rng.randint(0, spec["classes"], n))
        batch = {b"batch_label": b"batch " + m.encode(), b"data": data, spec["label_key"]: [int(v) for v in labels]}
        if name == "cifar100":
            batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
        members[m] = py2_pickle(batch)
        if m == spec["test"]:
            truth["test_x"], truth["test_y"] = data, np.array(labels)
        else:
            truth["train_x"].append(data)
            truth["train_y"].append(np.array(labels))
    names = [f"class_{i}".encode() for i in range(spec["classes"])]
    members[spec["meta"]] = py2_pickle({spec["names_key"]: names, b"num_vis": 3072})
    truth["train_x"], truth["train_y"] = np.concatenate(truth["train_x"]), np.concatenate(truth["train_y"])
    return members, truth


def write_cifar(root: Path, name: str, tar: bool, skip: tuple[str, ...] = ()) -> dict:
    """A CIFAR archive (tar=True) or extracted folder under `root`; returns the arrays written."""
    spec = CIFAR[name]
    members, truth = cifar_members(name)
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    for m, blob in members.items():
        if m not in skip:
            (folder / m).write_bytes(blob)
    if tar:
        with tarfile.open(root / spec["archive"], "w:gz") as t:
            t.add(folder, arcname=spec["folder"])
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    return truth


@pytest.fixture
def datafiles() -> SimpleNamespace:
    """The writers above, as a fixture: test modules need not import conftest by name."""
    return SimpleNamespace(
        idx_bytes=idx_bytes, mnist_arrays=mnist_arrays, write_mnist=write_mnist, py2_pickle=py2_pickle,
        CIFAR=CIFAR, cifar_members=cifar_members, write_cifar=write_cifar,
    )
