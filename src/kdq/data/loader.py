"""Batches straight from in-memory tensors: no workers, no per-sample Python."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kdq.data.augment import batch_crop, batch_flip
from kdq.data.core import Split


class BatchLoader:
    """Iterates a Split in batches of (x, y, idx); idx indexes the split (for cached teacher logits).

    With shuffle=True (training) the order is a fresh permutation each epoch and images are
    randomly cropped/flipped as asked; evaluation (shuffle=False) sees the data as it is.

    Data-parallel training (`world_size` > 1) gives every rank the same generator: each draws
    the same permutation and augments the same global batch of `batch_size`, then keeps its
    `rank`-th contiguous share. The ranks together see exactly the batches one process would,
    and their generators stay in step because each draws the same numbers.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False, crop_padding: int = 0,
                 flip: bool = False, drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        images = split.x.dim() == 4  # tabular rows have nothing to crop or mirror
        self.crop_padding = crop_padding if shuffle and images else 0
        self.flip = flip and shuffle and images
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        n, b = len(self.split), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One pass over the split; all randomness comes from `generator` (a CPU one)."""
        n, device = len(self.split), self.split.x.device
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = order.to(device, non_blocking=True)  # one transfer per epoch, not per batch
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.split.x.index_select(0, idx), self.split.y.index_select(0, idx)
            if self.crop_padding:
                x = batch_crop(x, self.crop_padding, generator)
            if self.flip:
                x = batch_flip(x, generator)
            if self.world_size > 1:  # after augmenting the whole batch, so every rank drew the same numbers
                idx, x, y = (t.tensor_split(self.world_size)[self.rank] for t in (idx, x, y))
            yield x, y, idx

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self.epoch()
