"""The distillation methods: one registry, `LOSSES`, one base class per kind of input.

    loss = LOSSES.get("dkd")(temperature=4, alpha=1, beta=8)
    out = loss(student_logits, teacher_logits, targets)       # {"loss": ..., "ce": ..., "tckd": ..., "nckd": ...}

A method is a loss module registered with `@register(name, family=...)`. What it reads decides
how it is called (`forward(student, teacher, targets, indices=None)`):

- `reads = "logits"`: the two models' logits, each (batch, classes);
- `reads = "features"`: lists of intermediate outputs, one per tapped layer pair (student,
  teacher), as the layers give them, e.g. (batch, channels, h, w);
- `reads = "embedding"`: the inputs of the two models' final classifier (`fc`), (batch, dim).

Before training, `setup(student, teacher, num_samples)` receives the shapes of what it reads
(without the batch dimension; lists for features) and the training set's size: the place to
build adapters (trainable parts of the objective) or a memory bank, and to refuse, in one
KdqError line, shapes no adapter can bridge. `includes_ce` says whether `loss` already holds
the cross-entropy on the labels (response methods, as their papers write them); otherwise
the objective adds it once. Every term a method returns is logged as train_<name>.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from kdq.errors import KdqError
from kdq.registry import Registry

FAMILIES = ("response", "feature", "relation", "contrastive")
READS = ("logits", "features", "embedding")
Shape = tuple[int, ...]

LOSSES: Registry[type[DistillLoss]] = Registry("distillation method", "kdq methods")


class DistillLoss(nn.Module):
    """Base of every registered method; see the module's docstring for the contract."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = "response"
    reads: ClassVar[str] = "logits"
    includes_ce: ClassVar[bool] = False
    default_weight: ClassVar[float] = 1.0  # its weight when combined with others, unless given
    # the commands' --temperature, --alpha and label smoothing reach a method only where its
    # option means the same thing (DKD's alpha weighs TCKD, not the KD/CE mix)
    shares: ClassVar[tuple[str, ...]] = ("temperature", "label_smoothing")
    needs_class_indices: ClassVar[bool] = False  # refuses mixup/cutmix probability targets
    paper: ClassVar[str] = ""

    def setup(self, student: Shape | Sequence[Shape], teacher: Shape | Sequence[Shape], num_samples: int) -> None:
        """Called once before training with the shapes of what it reads; no-op by default."""

    def forward(self, student: Any, teacher: Any, targets: torch.Tensor,
                indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def register(name: str, family: str, reads: str = "logits", *, includes_ce: bool = False,
             default_weight: float = 1.0, paper: str = "") -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    """Register a DistillLoss subclass under `name` (listed by `kdq methods`)."""
    if family not in FAMILIES or reads not in READS:
        raise ValueError(f"family must be one of {FAMILIES} and reads one of {READS}")

    def decorate(cls: type[DistillLoss]) -> type[DistillLoss]:
        cls.name, cls.family, cls.reads, cls.includes_ce = name, family, reads, includes_ce
        cls.default_weight, cls.paper = default_weight, paper
        return LOSSES.register(name)(cls)

    return decorate


# ---- checks every method uses for its options: one line naming the option and the fix


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0 (inf passes `> 0` and trains to nan)."""
    if not (is_number(value) and 0 < value < math.inf):
        raise KdqError(f"{name} must be > 0 and finite, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    if not (is_number(value) and 0 <= value < math.inf):
        raise KdqError(f"{name} must be >= 0 and finite, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    if not (is_number(value) and 0 <= value <= 1):
        raise KdqError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)
