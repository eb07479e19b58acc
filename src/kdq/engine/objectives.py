"""What a training step minimises: a callable returning a dict of named loss terms."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Objective(Protocol):
    """`(logits, targets, inputs, indices) -> {"loss": ..., other terms}`.

    `inputs` is the (augmented) batch the student saw and `indices` its rows in the
    training split, so a distiller can run a teacher online or look up cached outputs.
    `prepare(train_split, device)` runs once before the first step.
    """

    def __call__(
        self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor, indices: torch.Tensor
    ) -> dict[str, torch.Tensor]: ...


class CrossEntropy:
    """Plain supervised training, with optional label smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, logits, targets, inputs, indices):  # noqa: ANN001 - see Objective
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}
