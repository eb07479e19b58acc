"""What a training step minimises: a module returning a dict of named loss terms.

An objective may own trainable parts (adapters, auxiliary heads, a co-studied teacher): they
are its registered submodules. `fit` hands their parameters to the optimizer beside the
model's, switches them to train mode with the model, saves their state_dict in checkpoint.pt
and keeps the best epoch's copy beside the model's (see kdq.engine.train). A frozen model the
objective only reads (a distillation teacher) is not a part: `hold` it, so it stays out of
parameters() and state_dict().
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kdq.data import Split


class Objective(nn.Module):
    """`(logits, targets, inputs, indices) -> {"loss": ..., other terms}`; the trainer sums nothing
    itself: `loss` is what it minimises and every term is logged as train_<name>.

    `inputs` is the (augmented) batch the student saw and `indices` its rows in the training
    split, so a distiller can run a teacher online or look up cached outputs.
    `prepare(model, train, device)` runs once before the first step, after the student `model`
    is on `device`: the place to resolve feature taps on it (kdq.distill.hooks.FeatureTaps),
    so an unknown layer name fails before any training. An optional `start_epoch(epoch)`
    (0-based) runs before each epoch, a resumed one included, for schedules of the terms; an
    optional `release()` runs when training ends, to take the taps off again.
    """

    def prepare(self, model: nn.Module, train: Split, device: torch.device) -> None:
        self.to(device)

    def hold(self, name: str, module: nn.Module) -> None:
        """Keep `module` as attribute `name` without making it a part: never trained by this
        objective's optimizer group, never in its checkpointed state."""
        object.__setattr__(self, name, module)  # bypasses nn.Module's registration of submodules

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor, indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class LossFunction(Protocol):
    """What `fit` also accepts: any callable of the same signature, with no parts of its own."""

    def __call__(
        self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor, indices: torch.Tensor
    ) -> dict[str, torch.Tensor]: ...


def parts_of(objective: object) -> nn.Module | None:
    """The module whose parameters and state an objective contributes, or None if it has none."""
    if isinstance(objective, nn.Module) and (any(True for _ in objective.parameters())
                                             or any(True for _ in objective.buffers())):
        return objective
    return None


class CrossEntropy(Objective):
    """Plain supervised training, with optional label smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets, inputs, indices):  # noqa: ANN001 - see Objective
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}
