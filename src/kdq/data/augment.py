"""Augmentations applied to a whole batch at once, as in airbench.

All randomness is drawn on the CPU from the caller's generator, so a run is reproducible
from one seed whatever device the batch lives on; only small index tensors cross over.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdq.errors import KdqError


def batch_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of each image after zero-padding by `padding` pixels on every side."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    width = w + 2 * padding
    padded = F.pad(x, (padding,) * 4).view(n, c, -1)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    # one gather over the flattened padded image: benchmarked 2-4x faster than fancy indexing
    window = (torch.arange(h)[:, None] * width + torch.arange(w)).view(1, h * w)
    index = (window + (dy * width + dx)[:, None]).to(x.device, non_blocking=True)
    return padded.gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


def batch_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror left-right each image whose coin (torch.rand < 0.5, one per image) comes up."""
    chosen = (torch.rand(len(x), generator=generator) < 0.5).to(x.device, non_blocking=True)
    return torch.where(chosen.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)


def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): x = lam*x + (1-lam)*x[perm], lam ~ Beta(alpha, alpha).

    Returns the mixed inputs and soft targets (N, num_classes) whose rows sum to 1.
    """
    lam = _beta(alpha, generator)
    perm = torch.randperm(len(x), generator=generator).to(x.device, non_blocking=True)
    mixed = x.mul(lam).add_(x[perm], alpha=1 - lam)
    return mixed, _mix_targets(y, perm, lam, num_classes, x.dtype)


def cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al. 2019): paste a box from x[perm]; targets weighted by the box's true area.

    The box covers about 1-lam of the image, lam ~ Beta(alpha, alpha); where it is clipped at
    the border, lam is recomputed from the area actually pasted.
    """
    if x.dim() != 4:
        raise KdqError(f"cutmix needs images (N, C, H, W), got inputs of shape {tuple(x.shape)}; use mixup for tabular data")
    n, _, h, w = x.shape
    lam = _beta(alpha, generator)
    perm = torch.randperm(n, generator=generator).to(x.device, non_blocking=True)
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy = int(torch.randint(0, h, (1,), generator=generator))
    cx = int(torch.randint(0, w, (1,), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, _mix_targets(y, perm, lam, num_classes, x.dtype)


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    # torch.distributions takes no generator; numpy's Beta seeded from it stays reproducible
    if alpha <= 0:
        raise KdqError(f"mixup/cutmix alpha must be > 0, got {alpha}")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return float(np.random.RandomState(seed).beta(alpha, alpha))


def _mix_targets(y: torch.Tensor, perm: torch.Tensor, lam: float, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    one_hot = F.one_hot(y, num_classes).to(dtype)
    partner = one_hot[perm]  # taken before the in-place scaling below
    return one_hot.mul_(lam).add_(partner, alpha=1 - lam)
