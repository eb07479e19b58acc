"""BatchLoader and the batch-wise augmentations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdq.data import BatchLoader, Split, batch_crop, batch_flip, cutmix, mixup
from kdq.errors import KdqError


def _images(n: int = 103, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 2, 6, 5, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_covers_every_sample_once(shuffle):
    split = _images()
    loader = BatchLoader(split, 16, shuffle=shuffle)
    batches = list(loader.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == len(loader) == 7 and len(batches[-1][0]) == 103 - 6 * 16
    seen = torch.cat([idx for _, _, idx in batches])
    assert torch.equal(seen.sort().values, torch.arange(103)) and seen.dtype == torch.int64
    assert torch.equal(seen, torch.arange(103)) != shuffle
    for x, y, idx in batches:
        assert torch.equal(x, split.x[idx]) and torch.equal(y, split.y[idx])


def test_drop_last():
    loader = BatchLoader(_images(), 16, shuffle=True, drop_last=True)
    sizes = [len(x) for x, _, _ in loader.epoch(torch.Generator().manual_seed(0))]
    assert len(loader) == 6 and sizes == [16] * 6


def test_same_seed_same_batches():
    loader = BatchLoader(_images(), 16, shuffle=True, crop_padding=2, flip=True)

    def run(seed):
        return [(x, idx) for x, _, idx in loader.epoch(torch.Generator().manual_seed(seed))]

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(xa, xb) and torch.equal(ia, ib) for (xa, ia), (xb, ib) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])


def test_augmentation_only_when_shuffling_images():
    split = _images()
    for x, _, idx in BatchLoader(split, 32, crop_padding=2, flip=True).epoch():  # evaluation
        assert torch.equal(x, split.x[idx])
    table = Split(torch.randn(50, 7), torch.zeros(50, dtype=torch.int64))
    for x, _, idx in BatchLoader(table, 8, shuffle=True, crop_padding=2, flip=True).epoch(torch.Generator().manual_seed(0)):
        assert torch.equal(x, table.x[idx])
    augmented = [torch.equal(x, split.x[idx]) for x, _, idx in
                 BatchLoader(split, 32, shuffle=True, crop_padding=2, flip=True).epoch(torch.Generator().manual_seed(0))]
    assert not any(augmented)


def test_crop_shifts_each_image_with_zero_fill():
    x = torch.randn(40, 3, 7, 9)
    out = batch_crop(x, 3, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    # the same draws the crop made: dy for every image, then dx
    g = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 7, (40,), generator=g), torch.randint(0, 7, (40,), generator=g)
    padded = F.pad(x, (3, 3, 3, 3))
    for i in range(40):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 7, dx[i]:dx[i] + 9])
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 10
    assert batch_crop(x, 0) is x


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), pad=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_crop_only_moves_pixels(n, c, h, w, pad, seed):
    x = torch.arange(1, n * c * h * w + 1, dtype=torch.float32).view(n, c, h, w)
    out = batch_crop(x, pad, torch.Generator().manual_seed(seed))
    assert out.shape == x.shape
    for i in range(n):  # every value is zero fill or a pixel of the same image, shifted as a whole
        kept = out[i][out[i] != 0]
        assert set(kept.tolist()) <= set(x[i].flatten().tolist())


def test_flip_mirrors_exactly_the_chosen_images():
    x = torch.randn(64, 1, 4, 5)
    out = batch_flip(x, torch.Generator().manual_seed(3))
    chosen = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5
    assert 10 < chosen.sum() < 54
    assert torch.equal(out[chosen], x[chosen].flip(-1))
    assert torch.equal(out[~chosen], x[~chosen])


def test_mixup_rows_are_distributions():
    x, y = torch.randn(32, 3, 4, 4), torch.randint(0, 5, (32,))
    xm, ys = mixup(x, y, 5, 0.4, torch.Generator().manual_seed(0))
    assert xm.shape == x.shape and ys.shape == (32, 5)
    assert torch.allclose(ys.sum(1), torch.ones(32)) and (ys >= 0).all()
    again = mixup(x, y, 5, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], xm) and torch.equal(again[1], ys)
    tab, _ = mixup(torch.randn(32, 7), y, 5, 1.0, torch.Generator().manual_seed(0))  # tabular works too
    assert tab.shape == (32, 7)


def test_cutmix_weights_match_the_pasted_area():
    x, y = torch.randn(32, 3, 8, 8), torch.arange(32) % 4
    for seed in range(5):
        xm, ys = cutmix(x, y, 4, 1.0, torch.Generator().manual_seed(seed))
        assert torch.allclose(ys.sum(1), torch.ones(32))
        changed = (xm != x).any(1).flatten(1).sum(1)  # pixels pasted, for images whose partner differs
        lam = 1 - changed.max().item() / 64
        rows = ys.max(1).values
        assert torch.allclose(rows[(changed > 0) & (rows < 1)], torch.tensor(max(lam, 1 - lam)))


def test_cutmix_and_mixup_reject_bad_input():
    with pytest.raises(KdqError, match="cutmix needs images"):
        cutmix(torch.randn(4, 7), torch.zeros(4, dtype=torch.int64), 2, 1.0)
    with pytest.raises(KdqError, match="alpha must be > 0"):
        mixup(torch.randn(4, 7), torch.zeros(4, dtype=torch.int64), 2, 0.0)
