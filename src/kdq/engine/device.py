"""Device choice and reproducibility switches."""

from __future__ import annotations

import random

import numpy as np
import torch

from kdq.errors import KdqError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdqError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdqError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # Slower kernels, but the same numbers on every run of the same machine.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """fp16 autocast on CUDA; a disabled no-op context elsewhere (CPU bf16 is slower on most CPUs)."""
    use = enabled and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use)
