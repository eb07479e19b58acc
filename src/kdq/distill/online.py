"""Online distillation: deep mutual learning (Zhang et al., "Deep Mutual Learning", CVPR 2018).

Two or more students learn together, each from the labels and from the others' predictions;
no student is pretrained. In kdq the first student is the model `kdq.engine.fit` trains and
the others are this objective's trainable parts, so fit optimises, checkpoints (resume stays
bit-exact) and keeps the best epoch of all of them. `kdq.stages.mutual` saves each student as
a run directory of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdq.engine.objectives import Objective
from kdq.errors import KdqError

ONE_STUDENT = "mutual learning needs two or more students"


class MutualLearning(Objective):
    """Deep mutual learning: the loss of student k (k = 0..K-1) is

        L_k = CE(z_k, y) + 1/(K-1) * sum_{j != k} T^2 * KL(softmax(z_j / T) || softmax(z_k / T))

    with the peer's distribution p_j detached: each student's gradient comes from its own L_k
    only (the paper's Algorithm 1 and its reference code, which applies each network's loss
    to that network's variables alone). `loss` is sum_k L_k, so one optimizer step updates
    every student by the gradient of its own loss. The KL terms are averaged over the batch.

    Where kdq differs from the reference code: it follows the paper's 1/(K-1) mean over peers
    (the code sums them; the same for two students), and all students step together on the
    same batch from one forward pass (the code updates them one after another, each on a new
    batch). T = 1 is the paper's; another T scales the KL terms by T^2 so their gradients keep
    the size of CE's, as in Hinton KD.

    `students` are the peers of the model fit trains (student 0, whose logits fit passes in);
    they see the same (augmented) batch. Terms: loss, and ce_k, kl_k per student.
    """

    def __init__(self, students: Sequence[nn.Module], temperature: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if len(students) < 1:
            raise KdqError(ONE_STUDENT)
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                and 0 < temperature < math.inf):
            raise KdqError(f"temperature must be > 0 and finite, got {temperature!r}")
        self.students = nn.ModuleList(students)
        self.temperature = float(temperature)
        self.label_smoothing = label_smoothing

    def prepare(self, model: nn.Module, train, device: torch.device) -> None:  # noqa: ANN001 - see Objective
        if any(model is s for s in self.students):
            raise KdqError("the model fit trains is student 0; pass only its peers to MutualLearning")
        super().prepare(model, train, device)

    def forward(self, logits, targets, inputs, indices):  # noqa: ANN001 - see Objective
        every = [logits] + [student(inputs) for student in self.students]
        return mutual_terms(every, targets, self.temperature, self.label_smoothing)


def mutual_terms(logits: Sequence[torch.Tensor], targets: torch.Tensor, temperature: float = 1.0,
                 label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """{"loss": sum_k L_k, "ce_k": ..., "kl_k": ...} for the students' `logits` (see MutualLearning)."""
    t = temperature
    logits = [z.float() for z in logits]
    log_p = [F.log_softmax(z / t, dim=1) for z in logits]
    peers = len(logits) - 1
    terms: dict[str, torch.Tensor] = {}
    total = logits[0].new_zeros(())
    for k, z in enumerate(logits):
        ce = F.cross_entropy(z, targets, label_smoothing=label_smoothing)
        # KL(p_j || p_k) with p_j a fixed target: kl_div(log p_k, log p_j, log_target=True)
        kl = sum(F.kl_div(log_p[k], log_p[j].detach(), reduction="batchmean", log_target=True)
                 for j in range(len(logits)) if j != k) * (t * t / peers)
        terms[f"ce_{k}"], terms[f"kl_{k}"] = ce, kl
        total = total + ce + kl
    return {"loss": total, **terms}
