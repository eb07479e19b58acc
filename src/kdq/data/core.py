"""In-memory data sets: typed splits, the bundle, and `load_dataset`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdq.data.catalog import DATASETS
from kdq.data.sources import RawData
from kdq.errors import KdqError


@dataclass
class Split:
    """Inputs (float32, normalised; (N, C, H, W) or (N, F)) and int64 labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"split has {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "Split":
        """The split with both tensors on `device`."""
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class DataBundle:
    """A data set ready for training: splits plus what the engine needs to know about them.

    Images were scaled to [0, 1] (divided by 255, or 16 for digits) and then normalised with
    `mean`/`std` per channel; tabular features were normalised per feature.
    """

    name: str
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: list[float]
    std: list[float]
    input_shape: tuple[int, ...]
    crop_padding: int
    flip: bool
    # How load_dataset made it (subset, split seed, ...): recorded in run directories so that
    # later commands (quantize, qat, export) load exactly the same data again.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> "DataBundle":
        """The bundle with all three splits moved to `device`."""
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_size: int | float = 5000,
    subset: int | None = None,
    seed: int = 0,
    download: bool = True,
    **options: Any,
) -> DataBundle:
    """Load a registered data set as normalised CPU tensors with a seeded validation split.

    val_size: a count, or a fraction in (0, 1), carved out of the training set by a permutation
    seeded with `seed`. A count above a quarter of the training set (e.g. the default 5000 on
    digits or synthetic) falls back to 10% of it; at least one training sample always remains.
    subset: keep at most this many samples of each split (a seeded random choice), for quick runs.
    options: the data set's own (Source.configure), e.g. synthetic's samples, features and classes;
    None means the default, as for subset.
    """
    options = {k: v for k, v in options.items() if v is not None}
    source = DATASETS.get(name).configure(**options)
    if subset is not None and subset < 1:
        raise KdqError(f"subset must be a positive number of samples, got {subset}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:  # torch's generator limit
        raise KdqError(f"the split seed (--split-seed) must be an integer from 0 to 2**63 - 1, got {seed!r}")
    raw = source.read(data_dir, download=download)
    _check_labels(raw, source.num_classes, name)

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(raw.y_train), generator=g)
    n_val = _val_count(val_size, len(order))
    val_idx, train_idx = order[:n_val], order[n_val:]
    test_idx = torch.randperm(len(raw.y_test), generator=g) if subset else torch.arange(len(raw.y_test))
    # cut after the permutation so a subset is a random sample; sort so memory reads stay in order
    idx = {k: v[:subset].sort().values for k, v in (("train", train_idx), ("val", val_idx), ("test", test_idx))}

    x_train = _take(raw.x_train, idx["train"], raw.scale)
    dims = [0] if x_train.dim() == 2 else [0, 2, 3]  # per feature, or per channel
    std, mean = torch.std_mean(x_train, dim=dims, keepdim=True)
    std = std.clamp_min(1e-6)  # constant features (e.g. blank pixels) must not divide by zero

    def split(x: torch.Tensor, y: np.ndarray, i: torch.Tensor) -> Split:
        return Split(x.sub_(mean).div_(std), torch.from_numpy(y)[i].clone())

    return DataBundle(
        name=name,
        train=split(x_train, raw.y_train, idx["train"]),
        val=split(_take(raw.x_train, idx["val"], raw.scale), raw.y_train, idx["val"]),
        test=split(_take(raw.x_test, idx["test"], raw.scale), raw.y_test, idx["test"]),
        classes=list(raw.classes),
        mean=mean.flatten().tolist(),
        std=std.flatten().tolist(),
        input_shape=tuple(x_train.shape[1:]),
        crop_padding=source.crop_padding,
        flip=source.flip,
        options={k: v for k, v in {"data_dir": None if data_dir is None else str(data_dir), "val_size": val_size,
                                    "subset": subset, "seed": seed, **options}.items() if v is not None},
    )


def list_datasets(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per registered data set, with where its files are; reads no data."""
    rows = []
    for name in DATASETS.names():
        s = DATASETS.get(name)
        rows.append(dict(name=name, description=s.description, input_shape=s.input_shape,
                         num_classes=s.num_classes, location=s.location(data_dir)))
    return rows


def _val_count(val_size: int | float, n: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise KdqError(f"val_size must be a count or a fraction in (0, 1), got {val_size!r}")
    if isinstance(val_size, float) and val_size != 0:
        if not 0 < val_size < 1:
            raise KdqError(f"val_size as a fraction must lie in (0, 1), got {val_size}")
        count = round(val_size * n)
    elif val_size < 0:
        raise KdqError(f"val_size must be >= 0, got {val_size}")
    else:
        count = int(val_size) if val_size <= n // 4 else round(0.1 * n)
    return min(count, n - 1)


def _take(x: np.ndarray, idx: torch.Tensor, scale: float) -> torch.Tensor:
    # gather in the raw dtype (uint8 for images: 4x less to copy), then one float pass
    picked = torch.from_numpy(x[idx.numpy()])  # fancy indexing copies, so read-only buffers are fine
    return picked.to(torch.float32).div_(scale)


def _check_labels(raw: RawData, num_classes: int, name: str) -> None:
    for part, y in (("train", raw.y_train), ("test", raw.y_test)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise KdqError(f"{name} {part} labels run from {y.min()} to {y.max()}, expected 0..{num_classes - 1}; the files are damaged")
    if len(raw.classes) != num_classes:
        raise KdqError(f"{name} names {len(raw.classes)} classes, expected {num_classes}; the meta file is damaged")
