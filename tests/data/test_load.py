"""load_dataset: shapes, labels, normalisation, splits, search order and list_datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdq.data import DATASETS, list_datasets, load_dataset
from kdq.errors import KdqError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def _assert_normalised(bundle):
    dims = [0] if bundle.train.x.dim() == 2 else [0, 2, 3]
    std, mean = torch.std_mean(bundle.train.x, dim=dims)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_idx_files(tmp_path, datafiles, gz):
    arrays = datafiles.write_mnist(tmp_path, gz=gz)
    b = load_dataset("mnist", tmp_path, val_size=10, download=False)
    assert (len(b.train), len(b.val), len(b.test)) == (50, 10, 20)
    assert b.train.x.shape == (50, 1, 28, 28) and b.train.x.dtype == torch.float32
    assert b.train.y.dtype == torch.int64 and b.input_shape == (1, 28, 28)
    assert b.classes == [str(d) for d in range(10)] and b.num_classes == 10
    assert (b.crop_padding, b.flip) == (2, False)
    _assert_normalised(b)
    # undoing the normalisation gives back the test pixels, in file order
    pixels = (b.test.x * b.std[0] + b.mean[0]) * 255
    np.testing.assert_allclose(pixels[:, 0].numpy(), arrays["test_x"], atol=1e-3)
    np.testing.assert_array_equal(b.test.y.numpy(), arrays["test_y"])
    assert b.mean[0] == pytest.approx(np.concatenate([arrays["train_x"]]).mean() / 255, abs=0.02)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("tar", [True, False])
def test_cifar(tmp_path, datafiles, name, tar):
    truth = datafiles.write_cifar(tmp_path, name, tar=tar)
    b = load_dataset(name, tmp_path, val_size=0.2, download=False)
    n_train = len(truth["train_y"])
    assert len(b.train) + len(b.val) == n_train and len(b.val) == round(0.2 * n_train)
    assert b.train.x.shape[1:] == (3, 32, 32) and b.input_shape == (3, 32, 32)
    assert len(b.mean) == len(b.std) == 3
    assert b.classes == [f"class_{i}" for i in range(datafiles.CIFAR[name]["classes"])]
    assert (b.crop_padding, b.flip) == (4, True)
    _assert_normalised(b)
    np.testing.assert_array_equal(b.test.y.numpy(), truth["test_y"])
    # channel 0 of the first test image is the first 1024 bytes of its row (R plane, row-major)
    red = b.test.x[0, 0] * b.std[0] + b.mean[0]
    np.testing.assert_allclose((red * 255).flatten().numpy(), truth["test_x"][0, :1024], atol=1e-3)


def test_extracted_cifar_folder_given_directly(tmp_path, datafiles):
    datafiles.write_cifar(tmp_path, "cifar10", tar=False)
    b = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", val_size=10, download=False)
    assert len(b.train) == 90


def test_digits_and_synthetic_with_subset():
    d = load_dataset("digits", subset=100)
    assert d.input_shape == (1, 8, 8) and (len(d.train), len(d.test)) == (100, 100)
    assert (d.crop_padding, d.flip) == (0, False)
    s = load_dataset("synthetic", subset=300)
    assert s.input_shape == (20,) and s.train.x.shape == (300, 20) and s.num_classes == 10
    assert len(s.mean) == 20
    full = load_dataset("synthetic")
    # the default 5000 would take half the 10k training rows, so 10% is carved instead
    assert (len(full.train), len(full.val), len(full.test)) == (9000, 1000, 2000)
    _assert_normalised(full)


def test_val_split_is_seeded_and_disjoint():
    def split_ids(seed):
        # synthetic rows are distinct, so a row's first feature identifies it
        b = load_dataset("synthetic", val_size=0.2, seed=seed)
        return set(b.train.x[:, 0].tolist()), set(b.val.x[:, 0].tolist())

    train0, val0 = split_ids(0)
    assert not train0 & val0 and len(val0) == 2000
    assert split_ids(0) == (train0, val0)
    assert split_ids(1)[1] != val0


def test_test_split_does_not_depend_on_seed():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=5)
    assert torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.val.y, b.val.y)


@pytest.mark.parametrize("val_size, message", [(1.5, "in \\(0, 1\\)"), (-3, ">= 0"), ("10%", "count or a fraction")])
def test_bad_val_size(val_size, message):
    with pytest.raises(KdqError, match=message):
        load_dataset("synthetic", val_size=val_size)


def test_bad_subset():
    with pytest.raises(KdqError, match="subset must be a positive"):
        load_dataset("synthetic", subset=0)


def test_unknown_name_suggests():
    with pytest.raises(KdqError, match="did you mean fashion-mnist") as e:
        load_dataset("fashion_mnist")
    assert "kdq datasets" in str(e.value)


def test_kdq_data_env_is_searched(tmp_path, datafiles, monkeypatch):
    datafiles.write_mnist(tmp_path / "mnist")  # $KDQ_DATA/<name>
    monkeypatch.setenv("KDQ_DATA", str(tmp_path))
    assert len(load_dataset("mnist", val_size=0, download=False).train) == 60


def test_data_dir_wins_over_kdq_data(tmp_path, datafiles, monkeypatch):
    datafiles.write_mnist(tmp_path / "env", arrays=datafiles.mnist_arrays(n_train=30))
    datafiles.write_mnist(tmp_path / "arg", arrays=datafiles.mnist_arrays(n_train=40))
    monkeypatch.setenv("KDQ_DATA", str(tmp_path / "env"))
    assert len(load_dataset("mnist", tmp_path / "arg", val_size=0, download=False).train) == 40


def test_not_found_names_every_place_looked(tmp_path, no_real_data, monkeypatch):
    monkeypatch.setenv("KDQ_DATA", str(tmp_path / "kdqdata"))
    with pytest.raises(KdqError) as e:
        load_dataset("fashion-mnist", tmp_path / "mine", download=False)
    msg = str(e.value)
    assert "\n" not in msg and "downloading is off" in msg
    for place in [tmp_path / "mine", tmp_path / "kdqdata", tmp_path / "kdqdata" / "fashion-mnist",
                  no_real_data / "sys-fmnist", no_real_data / "cache" / "kdq" / "fashion-mnist"]:
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg


def test_list_datasets(tmp_path, datafiles):
    datafiles.write_mnist(tmp_path)
    rows = {r["name"]: r for r in list_datasets(tmp_path)}
    assert set(rows) == set(DATASETS.names()) >= {"fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "synthetic"}
    assert rows["mnist"]["location"] == str(tmp_path)
    assert rows["cifar100"]["location"].startswith("not found — ") and rows["cifar100"]["num_classes"] == 100
    assert rows["digits"]["location"] == "bundled with scikit-learn" and rows["synthetic"]["location"] == "generated"
    assert rows["fashion-mnist"]["input_shape"] == (1, 28, 28)


def test_bundle_to_moves_every_split():
    b = load_dataset("synthetic", subset=10).to("cpu")
    assert all(s.x.device.type == "cpu" for s in (b.train, b.val, b.test))


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    b = load_dataset("fashion-mnist", REAL_FASHION, subset=2000, download=False)
    assert (len(b.train), len(b.val), len(b.test)) == (2000, 2000, 2000)
    assert b.classes[0] == "T-shirt/top" and b.flip and b.crop_padding == 2
    assert b.mean[0] == pytest.approx(0.286, abs=0.01) and b.std[0] == pytest.approx(0.353, abs=0.01)
    assert torch.bincount(b.test.y, minlength=10).min() > 150  # a random, roughly balanced sample
