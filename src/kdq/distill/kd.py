"""Response-based distillation (Hinton et al., 2015)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdq.errors import KdqError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class KDLoss(nn.Module):
    """Hinton knowledge distillation.

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

    with both terms averaged over the batch. The T^2 factor keeps the soft term's gradient
    on the same scale as the hard term's when T changes (Hinton, Vinyals & Dean,
    "Distilling the Knowledge in a Neural Network", 2015, section 2). `targets` may be
    class indices or probability rows (mixup / cutmix / label smoothing).
    Returns a dict with `loss`, `kd` (the T^2-scaled KL term) and `ce`.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.7, label_smoothing: float = 0.0) -> None:
        super().__init__()
        # a finite number first: inf passes `> 0` and trains to nan
        if not (_is_number(temperature) and 0 < temperature < math.inf):
            raise KdqError(f"temperature must be > 0 and finite, got {temperature!r}")
        if not (_is_number(alpha) and 0 <= alpha <= 1):
            raise KdqError(f"alpha must be in [0, 1], got {alpha!r}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.label_smoothing = label_smoothing

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.temperature
        # KL in float32 even under autocast: log-softmax of fp16 logits / T loses the small probabilities.
        log_p_student = F.log_softmax(student.float() / t, dim=1)
        log_p_teacher = F.log_softmax(teacher.float() / t, dim=1)
        kd = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t
        ce = F.cross_entropy(student.float(), targets, label_smoothing=self.label_smoothing)
        return {"loss": self.alpha * kd + (1 - self.alpha) * ce, "kd": kd, "ce": ce}
