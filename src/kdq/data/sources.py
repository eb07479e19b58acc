"""The kinds of data source: files found on disk (or downloaded), and scikit-learn sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdq.data import formats
from kdq.data.download import fetch
from kdq.data.locate import cache_dir, mirror, search_folders
from kdq.errors import KdqError


@dataclass
class RawData:
    """Arrays as read, before splitting and normalisation."""

    x_train: np.ndarray  # (N, C, H, W) images or (N, F) features
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    scale: float  # raw values / scale lie in [0, 1] (255 for 8-bit pixels); 1 for tabular


@dataclass(frozen=True)
class Source:
    """What a data set is, and how to get its arrays."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    num_classes: int
    crop_padding: int  # random-crop padding that suits the image size; 0 turns cropping off
    flip: bool  # whether a mirrored sample is still a sample of the same class

    def configure(self, **options: Any) -> Source:
        """This data set with its own options applied (`load_dataset(name, **options)`).

        Most data sets take none; a generated one (synthetic) takes its size. The source with
        no options is the registered one, unchanged. A bad name or value is one KdqError line.
        """
        if options:
            raise KdqError(f"data set {self.name!r} takes no option {next(iter(options))!r}; "
                           "only generated data sets (synthetic) take options such as samples")
        return self

    def location(self, data_dir: str | Path | None = None) -> str:
        """Where the data comes from, without reading it."""
        raise NotImplementedError

    def read(self, data_dir: str | Path | None = None, download: bool = True) -> RawData:
        """The arrays as stored, fetching the files first where needed and allowed."""
        raise NotImplementedError


@dataclass(frozen=True)
class FileSource(Source):
    """Files searched for in the usual folders and downloaded into the cache when missing."""

    base_url: str = ""
    checksums: dict[str, tuple[str, str]] = field(default_factory=dict)  # file -> (algorithm, hex digest)
    size: str = ""  # download size, to set expectations
    files_hint: str = ""  # what a --data-dir folder must hold
    install_hint: str = ""  # a system package that provides the files, if any

    def find_in(self, folder: Path) -> Path | None:
        """The file or folder holding the whole data set inside `folder`, if there."""
        raise NotImplementedError

    def parse(self, found: Path) -> RawData:
        """Read the arrays from what `find_in` returned."""
        raise NotImplementedError

    def find(self, data_dir: str | Path | None) -> Path | None:
        """The first place in the search order that holds the whole data set."""
        for folder in search_folders(self.name, data_dir):
            if folder.is_dir() and (found := self.find_in(folder)):
                return found
        return None

    def location(self, data_dir: str | Path | None = None) -> str:
        found = self.find(data_dir)
        if found:
            return str(found)
        install = f"; or {self.install_hint}" if self.install_hint else ""
        return f"not found — downloaded on first use ({self.size}){install}"

    def read(self, data_dir: str | Path | None = None, download: bool = True) -> RawData:
        found = self.find(data_dir)
        if found is None:
            if not download:
                raise KdqError(self._not_found(data_dir, "downloading is off"))
            try:
                found = self.download()
            except KdqError as e:
                raise KdqError(self._not_found(data_dir, str(e))) from None
        return self.parse(found)

    def download(self) -> Path:
        """Fetch every file missing from the cache, verified by checksum."""
        dest = cache_dir(self.name)
        base = mirror(self.name, self.base_url)
        for file, (algo, digest) in self.checksums.items():
            if not (dest / file).is_file():
                fetch(base + file, dest / file, **{algo: digest})
        found = self.find_in(dest)
        if found is None:
            raise KdqError(f"downloaded {self.name} into {dest} but its files are still incomplete")
        return found

    def _not_found(self, data_dir: str | Path | None, why: str) -> str:
        looked = ", ".join(str(p) for p in search_folders(self.name, data_dir))
        install = f"{self.install_hint}, " if self.install_hint else ""
        return (f"{self.name} data not found ({why}); looked in {looked}; {install}pass --data-dir DIR holding "
                f"{self.files_hint} (data_dir= in Python; $KDQ_DATA works too), "
                f"or allow the download ({self.size} from {mirror(self.name, self.base_url)})")


@dataclass(frozen=True)
class IdxSource(FileSource):
    """The MNIST family: four IDX files, gzipped or not."""

    classes: tuple[str, ...] = ()
    files: tuple[str, ...] = (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
    )

    def _file(self, folder: Path, stem: str) -> Path | None:
        # the plain file first: it skips the gunzip
        return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)

    def find_in(self, folder: Path) -> Path | None:
        return folder if all(self._file(folder, f) for f in self.files) else None

    def parse(self, found: Path) -> RawData:
        paths = [self._file(found, f) for f in self.files]
        x_train, y_train = formats.read_idx_pair(paths[0], paths[1])
        x_test, y_test = formats.read_idx_pair(paths[2], paths[3])
        return RawData(x_train, y_train, x_test, y_test, list(self.classes), 255.0)


@dataclass(frozen=True)
class CifarSource(FileSource):
    """The CIFAR python version: a .tar.gz of pickled batches, or its extracted folder."""

    archive: str = ""  # cifar-10-python.tar.gz
    folder: str = ""  # the folder inside it, cifar-10-batches-py
    train_members: tuple[str, ...] = ()
    test_member: str = "test_batch"
    meta_member: str = "batches.meta"
    label_key: bytes = b"labels"
    names_key: bytes = b"label_names"

    def find_in(self, folder: Path) -> Path | None:
        if (folder / self.meta_member).is_file():  # data_dir pointed at the extracted folder itself
            return folder
        for candidate in (folder / self.folder, folder / self.archive):
            if candidate.exists():
                return candidate
        return None

    def parse(self, found: Path) -> RawData:
        members = [*self.train_members, self.test_member, self.meta_member]
        blobs = formats.read_cifar_members(found, self.folder, members)
        train = [formats.parse_cifar_batch(blobs[m], f"{found}/{m}", self.label_key) for m in self.train_members]
        x_test, y_test = formats.parse_cifar_batch(blobs[self.test_member], f"{found}/{self.test_member}", self.label_key)
        classes = formats.parse_cifar_names(blobs[self.meta_member], f"{found}/{self.meta_member}", self.names_key)
        x_train = np.concatenate([x for x, _ in train])
        y_train = np.concatenate([y for _, y in train])
        return RawData(x_train, y_train, x_test, y_test, classes, 255.0)
