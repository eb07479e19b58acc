"""IDX and CIFAR parsing, including every way a file can be damaged."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

from kdq.data import formats, load_dataset
from kdq.errors import KdqError


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz, datafiles):
    arrays = datafiles.write_mnist(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    x, y = formats.read_idx_pair(tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert x.shape == (60, 1, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 0], arrays["train_x"])
    np.testing.assert_array_equal(y, arrays["train_y"])
    assert y.dtype == np.int64


def _damage(tmp_path, datafiles, stem: str, blob: bytes) -> None:
    datafiles.write_mnist(tmp_path, gz=False)
    (tmp_path / stem).write_bytes(blob)


@pytest.mark.parametrize("case, message", [
    ("labels magic", "not an IDX file with 3 dimension"),
    ("garbage", "not an IDX file"),
    ("empty", "not an IDX file"),
    ("truncated", "truncated: header says"),
    ("short header", "truncated IDX header"),
])
def test_corrupt_idx_images(tmp_path, datafiles, case, message):
    blob = {
        "labels magic": datafiles.idx_bytes(np.zeros(60, np.uint8)),  # a labels file under the images name
        "garbage": b"PK\x03\x04 a zip file",
        "empty": b"",
        "truncated": datafiles.idx_bytes(np.zeros((60, 28, 28), np.uint8))[:-100],
        "short header": b"\x00\x00\x08\x03\x00\x00",
    }[case]
    _damage(tmp_path, datafiles, "train-images-idx3-ubyte", blob)
    with pytest.raises(KdqError, match=message) as e:
        load_dataset("mnist", tmp_path, download=False)
    assert "train-images-idx3-ubyte" in str(e.value) and "\n" not in str(e.value)


def test_image_and_label_counts_must_agree(tmp_path, datafiles):
    _damage(tmp_path, datafiles, "train-labels-idx1-ubyte", datafiles.idx_bytes(np.zeros(59, np.uint8)))
    with pytest.raises(KdqError, match="60 images but train-labels-idx1-ubyte holds 59 labels"):
        load_dataset("mnist", tmp_path, download=False)


def test_labels_out_of_range(tmp_path, datafiles):
    _damage(tmp_path, datafiles, "t10k-labels-idx1-ubyte", datafiles.idx_bytes(np.full(20, 12, np.uint8)))
    with pytest.raises(KdqError, match="labels run from 12 to 12, expected 0..9"):
        load_dataset("mnist", tmp_path, download=False)


def test_gz_that_is_not_gzip(tmp_path, datafiles):
    datafiles.write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(KdqError, match="t10k-images-idx3-ubyte.gz: not a gzip file"):
        load_dataset("mnist", tmp_path, download=False)


def test_truncated_gzip(tmp_path, datafiles):
    datafiles.write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(KdqError, match="damaged gzip file"):
        load_dataset("mnist", tmp_path, download=False)


def test_cifar_pickles_parse_like_the_originals(datafiles):
    members, truth = datafiles.cifar_members("cifar10")
    x, y = formats.parse_cifar_batch(members["test_batch"], "test_batch", b"labels")
    assert x.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(x.reshape(20, -1), truth["test_x"])
    np.testing.assert_array_equal(y, truth["test_y"])
    assert b"cnumpy.core.multiarray\n_reconstruct" in members["test_batch"]  # the numpy 1.x name


def test_protocol_4_pickles_also_parse():
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    blob = pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=4)
    x, y = formats.parse_cifar_batch(blob, "batch", b"labels")
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 4]


@pytest.mark.parametrize("blob", [
    b"cos\nsystem\n(S'echo pwned'\ntR.",  # the classic: call os.system on load
    b"cbuiltins\neval\n(S'1+1'\ntR.",
    b"cnumpy\nload\n(S'x.npy'\ntR.",  # numpy, but not on the allow-list
])
def test_pickle_globals_outside_the_allow_list_are_refused(blob):
    with pytest.raises(KdqError, match="refused global"):
        formats.load_pickle(blob, "evil")


def test_malicious_cifar_batch_never_runs(tmp_path, datafiles):
    datafiles.write_cifar(tmp_path, "cifar10", tar=False)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(
        f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(KdqError, match="data_batch_2: not a CIFAR python pickle.*refused global os.system"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not marker.exists()


def test_cifar_batch_with_wrong_contents(tmp_path, datafiles):
    datafiles.write_cifar(tmp_path, "cifar10", tar=False)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(datafiles.py2_pickle({b"data": [1, 2, 3]}))
    with pytest.raises(KdqError, match="test_batch: not a CIFAR batch"):
        load_dataset("cifar10", tmp_path, download=False)


@pytest.mark.parametrize("tar", [True, False])
def test_cifar_missing_batch(tmp_path, tar, datafiles):
    datafiles.write_cifar(tmp_path, "cifar10", tar=tar, skip=("data_batch_3",))
    with pytest.raises(KdqError, match="CIFAR data incomplete, missing data_batch_3"):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar_archive_that_is_not_a_tarball(tmp_path, datafiles):
    (tmp_path / datafiles.CIFAR["cifar100"]["archive"]).write_bytes(gzip.compress(b"not a tar"))
    with pytest.raises(KdqError, match="damaged CIFAR archive"):
        load_dataset("cifar100", tmp_path, download=False)


# ---- hostile IDX files: sizes from the header are checked before reading, .gz is streamed


def _gzip_stream(path, header: bytes, zeros: int) -> None:
    """A .gz of `header` then `zeros` zero bytes, written in chunks (50 MB of zeros is ~50 KB)."""
    chunk = b"\0" * (1 << 20)
    with gzip.open(path, "wb") as f:
        f.write(header)
        for start in range(0, zeros, len(chunk)):
            f.write(chunk[: min(len(chunk), zeros - start)])


def test_gz_header_claiming_gigabytes_is_refused_before_reading(tmp_path, datafiles):
    import struct

    datafiles.write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _gzip_stream(path, bytes([0, 0, 8, 3]) + struct.pack(">3I", 1 << 20, 64, 64), 1 << 20)  # claims 4 GiB
    with pytest.raises(KdqError, match=r"header claims an array of \(1048576, 64, 64\)") as e:
        load_dataset("mnist", tmp_path, download=False)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_gz_zero_bomb_after_the_data_is_never_inflated(tmp_path, datafiles):
    import struct
    import tracemalloc

    datafiles.write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    # the header matches the 60 labels; 50 MB of zeros follow the 60 x 28 x 28 bytes it describes
    _gzip_stream(path, bytes([0, 0, 8, 3]) + struct.pack(">3I", 60, 28, 28), 50 << 20)
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(KdqError, match="more data than its header's"):
            load_dataset("mnist", tmp_path, download=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20  # the whole file inflated would be a 50 MB bytes object


def test_raw_idx_with_trailing_data(tmp_path, datafiles):
    _damage(tmp_path, datafiles, "t10k-images-idx3-ubyte", datafiles.idx_bytes(np.zeros((20, 28, 28), np.uint8)) + b"\0")
    with pytest.raises(KdqError, match="t10k-images-idx3-ubyte: more data than its header's"):
        load_dataset("mnist", tmp_path, download=False)


def test_image_count_is_checked_before_the_images_are_read(tmp_path, datafiles):
    import struct

    datafiles.write_mnist(tmp_path, gz=False)
    # 61 images claimed, no image data at all: refused on the count, not on the truncation
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 61, 28, 28))
    with pytest.raises(KdqError, match="61 images but train-labels-idx1-ubyte holds 60 labels"):
        load_dataset("mnist", tmp_path, download=False)


def test_hostile_idx_through_the_cli(tmp_path, datafiles, capsys):
    import struct

    from kdq.cli import main

    datafiles.write_mnist(tmp_path / "data", gz=True)
    _gzip_stream(tmp_path / "data" / "t10k-labels-idx1-ubyte.gz", bytes([0, 0, 8, 1]) + struct.pack(">I", 4_000_000_000), 0)
    code = main(["train", "--data", "mnist", "--data-dir", str(tmp_path / "data"), "--no-download", "--model", "cnn-tiny",
                 "--epochs", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdq: error:") and "t10k-labels-idx1-ubyte.gz" in lines[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()
