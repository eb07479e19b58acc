"""Driven by tests/engine/test_distributed.py under torchrun: fit() on digits with an objective
that owns a trainable part, straight through, interrupted in epoch 3, or resumed.

    python -m torch.distributed.run --nproc_per_node=2 tests/engine/ddp_fit.py OUT straight|interrupt|resume
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from kdq.data import load_dataset
from kdq.engine import TrainConfig, distributed, fit
from kdq.engine.objectives import Objective
from kdq.models import create_model

CFG = TrainConfig(epochs=4, batch_size=64, lr=0.1, progress=False, warmup_epochs=0.0, augment=True, device="cpu")


class ScaledCE(Objective):
    """Cross-entropy of logits times a learned scale: a part the optimizer trains on every rank."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.interrupt_at, self.steps = interrupt_at, 0

    def forward(self, logits, targets, inputs, indices):  # noqa: ANN001
        self.steps += 1
        if self.steps == self.interrupt_at:
            raise KeyboardInterrupt  # on every rank at the same step, as a torchrun-wide stop would
        ce = F.cross_entropy(logits * self.scale, targets)
        return {"loss": ce, "ce": ce}


def main(out: str, mode: str) -> None:
    data = load_dataset("digits", subset=300)
    torch.manual_seed(0 if mode != "resume" else 123)  # a resumed process starts from other weights
    model = create_model("cnn-tiny", data.num_classes, 1)
    steps_per_epoch = len(data.train) // CFG.batch_size  # the ragged tail is dropped
    objective = ScaledCE(2 * steps_per_epoch + 2 if mode == "interrupt" else None)  # a step in epoch 3
    try:
        fit(model, data, CFG, out, objective=objective, resume=mode == "resume")
    except KeyboardInterrupt:
        pass
    else:
        print(f"rank {distributed.rank()} final {distributed.state_hash(model)} {distributed.state_hash(objective)}",
              file=sys.stderr)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
