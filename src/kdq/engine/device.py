"""Device choice and reproducibility switches."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from kdq.errors import KdqError


DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; an unknown or unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    # torch also parses devices kdq cannot train on (meta, xla, ...): name the ones it can
    if device is None or device.type not in ("cpu", "cuda", "mps") or (device.type != "cuda" and device.index):
        raise KdqError(f"unknown device {name!r}; use {DEVICE_NAMES}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KdqError(f"device {name!r} requested but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= count:
            raise KdqError(f"device {name!r} requested but only {count} CUDA GPU(s) are visible; use cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KdqError(f"device {name!r} requested but Apple's MPS is not available here; use --device cpu")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (the CPU and every GPU).

    On the CPU the same seed already gives the same numbers. `deterministic` is for CUDA:
    deterministic cuDNN and cuBLAS kernels, no cuDNN autotuning (slower); an operation with
    no deterministic CUDA kernel warns once instead of failing.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS reads this when it creates its handle, at the first CUDA matrix product; seeding
        # comes before the model is built, so before that. A value the user set is kept.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """fp16 autocast on CUDA; a disabled no-op context elsewhere (CPU bf16 is slower on most CPUs)."""
    use = enabled and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use)
