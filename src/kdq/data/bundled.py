"""Data sets that need no files: scikit-learn's digits and a generated tabular problem."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdq.data.sources import RawData, Source

# The held-out test part of these sets never depends on the user's seed, so test
# accuracies stay comparable across runs; the seed only moves the val split.
_HOLDOUT_SEED = 0


@dataclass(frozen=True)
class DigitsSource(Source):
    """sklearn's 8x8 handwritten digits (1,797 images, values 0..16); 20% held out as test."""

    test_fraction: float = 0.2

    def location(self, data_dir: str | Path | None = None) -> str:
        return "bundled with scikit-learn"

    def read(self, data_dir: str | Path | None = None, download: bool = True) -> RawData:
        from sklearn.datasets import load_digits  # import lazily: sklearn is slow to import

        digits = load_digits()
        x = digits.images.astype(np.float32)[:, None]
        y = digits.target.astype(np.int64)
        order = np.random.RandomState(_HOLDOUT_SEED).permutation(len(y))  # the file is sorted by writer
        n_test = round(self.test_fraction * len(y))
        test, train = order[:n_test], order[n_test:]
        return RawData(x[train], y[train], x[test], y[test], [str(c) for c in digits.target_names], 16.0)


@dataclass(frozen=True)
class SyntheticSource(Source):
    """A fixed tabular classification problem from make_classification, like a user's own table."""

    n_samples: int = 12000
    n_test: int = 2000

    def location(self, data_dir: str | Path | None = None) -> str:
        return "generated"

    def read(self, data_dir: str | Path | None = None, download: bool = True) -> RawData:
        from sklearn.datasets import make_classification

        (n_features,) = self.input_shape
        # informative + redundant features with label noise: a teacher clearly beats a linear model,
        # and a small student has something to learn from soft targets
        x, y = make_classification(
            n_samples=self.n_samples, n_features=n_features, n_informative=12, n_redundant=4,
            n_classes=self.num_classes, n_clusters_per_class=2, class_sep=1.5, flip_y=0.02,
            random_state=_HOLDOUT_SEED,
        )
        x, y = x.astype(np.float32), y.astype(np.int64)
        cut = self.n_samples - self.n_test  # make_classification already shuffles the rows
        classes = [f"class {i}" for i in range(self.num_classes)]
        return RawData(x[:cut], y[:cut], x[cut:], y[cut:], classes, 1.0)
