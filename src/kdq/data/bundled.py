"""Data sets that need no files: scikit-learn's digits and a generated tabular problem."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdq.data.sources import RawData, Source
from kdq.errors import KdqError, short_repr, suggest

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


# Bounds on the synthetic options: make_classification builds float64 samples x features in
# memory, so the product is capped too (50M cells are 400 MB); more is a typo, not a table.
SYNTHETIC_LIMITS = {"samples": 1_000_000, "features": 10_000, "classes": 1_000}
_MAX_CELLS = 50_000_000
_SAMPLES_PER_CLASS = 10  # fewer leaves classes without test rows
_CLUSTERS = 2  # clusters per class: make_classification puts them on hypercube corners


@dataclass(frozen=True)
class SyntheticSource(Source):
    """A fixed tabular classification problem from make_classification, like a user's own table.

    Options (`configure`, YAML `data: {name: synthetic, samples: 1000, features: 20, classes: 3}`)
    size the problem; without them it is the registered 12,000 x 20, 10-class one, byte for byte.
    A sixth of the samples is the held-out test part (2,000 of 12,000), whatever the size.
    """

    n_samples: int = 12000

    @property
    def n_test(self) -> int:
        return self.n_samples // 6

    def configure(self, **options: Any) -> SyntheticSource:
        unknown = [str(k) for k in options if k not in SYNTHETIC_LIMITS]
        if unknown:
            raise KdqError(f"data set {self.name!r} has no option {short_repr(unknown[0])}"
                           f"{suggest(unknown[0], SYNTHETIC_LIMITS)}; "
                           f"its options: {', '.join(SYNTHETIC_LIMITS)}")
        if not options:
            return self
        low = {"samples": _SAMPLES_PER_CLASS * 2, "features": 1, "classes": 2}
        for key, value in options.items():
            if isinstance(value, bool) or not isinstance(value, int) or not low[key] <= value <= SYNTHETIC_LIMITS[key]:
                raise KdqError(f"{self.name} {key} must be an integer from {low[key]} to {SYNTHETIC_LIMITS[key]:,}, "
                               f"got {short_repr(value)}")
        samples = options.get("samples", self.n_samples)
        features = options.get("features", self.input_shape[0])
        classes = options.get("classes", self.num_classes)
        if samples < _SAMPLES_PER_CLASS * classes:
            raise KdqError(f"{self.name}: {samples} samples are too few for {classes} classes; "
                           f"give samples >= {_SAMPLES_PER_CLASS * classes} ({_SAMPLES_PER_CLASS} per class)")
        if samples * features > _MAX_CELLS:
            raise KdqError(f"{self.name}: {samples:,} samples x {features:,} features is over {_MAX_CELLS:,} values; "
                           "lower samples or features")
        needed = math.ceil(math.log2(_CLUSTERS * classes))  # informative features whose corners hold every cluster
        if _informative(features) < needed:
            raise KdqError(f"{self.name}: {features} features cannot hold {classes} classes of {_CLUSTERS} clusters "
                           f"(make_classification needs {_CLUSTERS * classes} <= 2^informative features); "
                           f"give features >= {needed}")
        return dataclasses.replace(self, input_shape=(features,), num_classes=classes, n_samples=samples)

    def location(self, data_dir: str | Path | None = None) -> str:
        return "generated"

    def read(self, data_dir: str | Path | None = None, download: bool = True) -> RawData:
        from sklearn.datasets import make_classification

        (n_features,) = self.input_shape
        informative = _informative(n_features)
        # informative + redundant features with label noise: a teacher clearly beats a linear model,
        # and a small student has something to learn from soft targets
        x, y = make_classification(
            n_samples=self.n_samples, n_features=n_features, n_informative=informative,
            n_redundant=min(4, n_features - informative), n_classes=self.num_classes, n_clusters_per_class=_CLUSTERS,
            class_sep=1.5, flip_y=0.02, random_state=_HOLDOUT_SEED,
        )
        x, y = x.astype(np.float32), y.astype(np.int64)
        cut = self.n_samples - self.n_test  # make_classification already shuffles the rows
        classes = [f"class {i}" for i in range(self.num_classes)]
        return RawData(x[:cut], y[:cut], x[cut:], y[cut:], classes, 1.0)


def _informative(features: int) -> int:
    """12 informative features (the registered problem's), or all of them when there are fewer."""
    return min(12, features)
