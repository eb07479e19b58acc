"""Distillation as a training objective: a frozen teacher, run online or cached."""

from __future__ import annotations

import torch
from torch import nn

from kdq.data import Split
from kdq.distill.kd import KDLoss
from kdq.engine.evaluate import predict
from kdq.engine.objectives import Objective
from kdq.errors import KdqError

TEACHER_MODES = ("online", "cached")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher's BN statistics and weights never move."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Distiller(Objective):
    """Objective that scores the student's logits against a teacher's with `loss`.

    online: the teacher sees the same augmented batch as the student (default).
    cached: teacher logits are computed once over the un-augmented training set and looked
    up by sample index; far cheaper for an expensive teacher, at the price of soft targets
    that ignore the augmentation.
    The frozen teacher is held, not a part: Hinton KD has no trainable parts of its own.
    """

    def __init__(self, teacher: nn.Module, loss: KDLoss, mode: str = "online", batch_size: int = 512) -> None:
        super().__init__()
        if mode not in TEACHER_MODES:
            raise KdqError(f"teacher mode must be one of {', '.join(TEACHER_MODES)}, got {mode!r}")
        self.hold("teacher", freeze(teacher))
        self.loss = loss
        self.mode = mode
        self.batch_size = batch_size
        self.cache: torch.Tensor | None = None

    def prepare(self, model: nn.Module, train: Split, device: torch.device) -> None:
        super().prepare(model, train, device)
        self.teacher.to(device)
        if self.mode == "cached":
            self.cache = predict(self.teacher, train.x, self.batch_size).to(device)

    def teacher_logits(self, inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[indices]
        self.teacher.eval()  # stays frozen even if a caller flipped it to train mode
        with torch.no_grad():
            return self.teacher(inputs)

    def forward(self, logits, targets, inputs, indices):  # noqa: ANN001 - see kdq.engine.objectives
        return self.loss(logits, self.teacher_logits(inputs, indices), targets)
