"""Shared fixtures: tiny, learnable data sets and models so tests run in seconds on 2 cores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdq.data import DataBundle, Split


def make_bundle(n_train: int = 192, n_eval: int = 64, classes: int = 4, seed: int = 0) -> DataBundle:
    """1x8x8 images whose class is the brightest quadrant: learnable in a couple of epochs."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
        for c in range(classes):
            r, col = divmod(c, 2)
            x[y == c, :, r * 4 : r * 4 + 4, col * 4 : col * 4 + 4] += 1.5
        return Split(x, y)

    return DataBundle(
        name="toy", train=split(n_train), val=split(n_eval), test=split(n_eval),
        classes=[f"c{i}" for i in range(classes)], mean=[0.0], std=[1.0],
        input_shape=(1, 8, 8), crop_padding=1, flip=False,
    )


class TinyNet(nn.Module):
    """Conv + BN + dropout: exercises running statistics and the global RNG."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.drop(self.features(x).flatten(1)))


@pytest.fixture
def toy_data() -> DataBundle:
    return make_bundle()
