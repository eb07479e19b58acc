"""The teacher: frozen, run online or once over the training set (cached); several as an Ensemble."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdq.distill.methods import is_number
from kdq.errors import KdqError, short_repr

TEACHER_MODES = ("online", "cached")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher's BN statistics and weights never move."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a wrapper that says so with `kdq_wrapped` (kdq.rundir.load's input-units
    wrapper): the one whose module names its feature_layers() gives."""
    inner = getattr(model, "kdq_wrapped", None)
    return unwrap(inner) if isinstance(inner, nn.Module) else model


def ensemble_weights(weights: Sequence[Any] | None, count: int) -> list[float]:
    """`count` teachers' weights: each >= 0 and finite, not all 0 (equal weights when None)."""
    if weights is None:
        return [1.0] * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != count:
        raise KdqError(f"teacher weights must be a list of {count} numbers, one per teacher, got {short_repr(weights)}; "
                       "e.g. --teacher-weights 0.7,0.3")
    for w in weights:
        if not (is_number(w) and 0 <= w < math.inf):
            raise KdqError(f"teacher weights must be finite numbers >= 0, got {short_repr(w)} in {short_repr(weights)}")
    if not any(weights):
        raise KdqError("teacher weights are all 0, so no teacher would teach; give at least one weight > 0")
    return [float(w) for w in weights]


class Ensemble(nn.Module):
    """Several frozen teachers as one: the weighted mean of their logits (equal weights by default).

    The weights are normalised to sum to 1, so the ensemble's logits stay on its members'
    scale (a temperature means what it means for one teacher); a teacher of weight 0 is not
    run. Each member takes the same inputs (kdq.rundir.load.load_teacher puts each in the
    student's input units). Methods that tap features have no single set of layers to read here.
    """

    def __init__(self, teachers: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(teachers) < 1:
            raise KdqError("an ensemble needs at least one teacher")
        raw = ensemble_weights(weights, len(teachers))
        self.members = nn.ModuleList(freeze(t) for t in teachers)
        self.weights = [w / sum(raw) for w in raw]
        freeze(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for teacher, w in zip(self.members, self.weights):
            if w == 0:
                continue
            logits = w * teacher(x).float()  # in float32: members may differ in precision (int8, low-bit, autocast)
            total = logits if total is None else total + logits
        assert total is not None  # ensemble_weights refuses all-zero weights
        return total
