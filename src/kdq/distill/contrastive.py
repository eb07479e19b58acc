"""Contrastive distillation methods (see kdq.distill.methods for the contract)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdq.distill.methods import DistillLoss, Shape, check_positive, is_number, register
from kdq.errors import KdqError

_EPS = 1e-7  # the reference's guard in the NCE ratios


def _whole(value: Any) -> int | None:
    """`value` as an int when it is a whole number (3 or 3.0), else None (bools, nan, inf, 2.5)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_count(name: str, value: Any) -> int:
    whole = _whole(value)
    if whole is None or whole < 1:
        raise KdqError(f"{name} must be a whole number >= 1, got {value!r}")
    return whole


@register("crd", "contrastive", "embedding", includes_ce=False, default_weight=0.8,
          paper="Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020")
class CRDLoss(DistillLoss):
    """Contrastive representation distillation.

    Two linear heads map the student's and the teacher's embeddings (the inputs of their `fc`)
    to `feat_dim` values, L2-normalised: e_s, e_t. Two memory banks, one row per training
    sample, hold a running copy of past e_s (student bank) and e_t (teacher bank). For each
    sample i, with its own bank row as the positive and `nce_k` other rows as negatives:

        score(e, row) = exp(e . row / nce_t) / Z          (Z fixed on the first batch:
                                                           mean of exp(e . row / nce_t) * N)
        h(x) = x / (x + K / N)                            (N training samples, K negatives)
        L_s = -(1/B) sum_i [log h(score(e_s_i, teacher bank[i]))
                            + sum_k log(1 - h(score(e_s_i, teacher bank[neg_k])))]
        L_t = the same with e_t against the student bank
        crd = loss = L_s + L_t

    (1e-7 guards each ratio as in the reference). After the scores, in training mode, each
    bank row i moves to normalise(nce_m * row + (1 - nce_m) * e_i). This is the NCE form of
    the paper (eq. 18) and of its reference code (RepDistiller crd/, also mdistiller CRD.py),
    which gave the published CIFAR-100 numbers; kdq follows it rather than the InfoNCE /
    softmax variant, which the paper only mentions as an alternative. The teacher head trains
    too (the teacher's embedding itself is fixed).

    Where kdq and the reference differ:
    - negatives: the reference's CIFAR loader draws, per sample, rows of the other classes;
      kdq draws rows uniformly among all rows but the sample's own (the noise distribution the
      NCE formula assumes, P_n = 1/N), at most N - 1 of them. nce_k is 4096 by default, the
      default of the reference's sampling data set; its training script and the paper use
      16384 (nce_k=16384; the gradient depends little on K, so the weight carries over);
    - the draws come from a torch.Generator seeded with `seed` whose state is a buffer, saved
      with the banks, so a run, and a run resumed from a checkpoint, draws the same negatives;
    - the banks are initialised, like the reference's, uniform in +-1/sqrt(feat_dim / 3), but
      from the same seeded generator (the heads use torch's global generator, like any layer).
    default_weight 0.8 is RepDistiller's `-b 0.8` for CRD (mdistiller CFG.CRD.LOSS.FEAT_WEIGHT).
    All math runs in float32 (the heads' dtype), autocast off: exp(1 / 0.07) overflows float16.
    """

    def __init__(self, feat_dim: int = 128, nce_k: int = 4096, nce_t: float = 0.07, nce_m: float = 0.5,
                 seed: int = 0) -> None:
        super().__init__()
        self.feat_dim = _check_count("feat_dim", feat_dim)
        self.nce_k = _check_count("nce_k", nce_k)
        self.nce_t = check_positive("nce_t", nce_t)
        if not (is_number(nce_m) and 0 <= nce_m < 1):
            raise KdqError(f"nce_m must be in [0, 1) (the memory bank's momentum), got {nce_m!r}")
        self.nce_m = float(nce_m)
        whole = _whole(seed)
        if whole is None or not 0 <= whole < 2**31:
            raise KdqError(f"seed must be a whole number in [0, 2**31), got {seed!r}")
        self.seed = whole
        self.num_samples = 0  # set by setup()

    def setup(self, student: Shape | Sequence[Shape], teacher: Shape | Sequence[Shape], num_samples: int) -> None:
        """Build the two heads and the two memory banks (num_samples x feat_dim buffers)."""
        shapes = {"student": tuple(student), "teacher": tuple(teacher)}  # type: ignore[arg-type]
        for side, dims in shapes.items():
            if not dims or not all(isinstance(d, int) and d >= 1 for d in dims):
                raise KdqError(f"crd: student embedding {shapes['student']} and teacher embedding "
                               f"{shapes['teacher']}: the {side}'s has no values for a linear head to read; "
                               "use models whose classifier input is (batch, features)")
        if not (isinstance(num_samples, int) and num_samples >= 2):
            raise KdqError(f"crd needs a training set of at least 2 samples (one positive, one negative), "
                           f"got {num_samples!r}")
        self.num_samples = num_samples
        self.embed_student = nn.Linear(math.prod(shapes["student"]), self.feat_dim)
        self.embed_teacher = nn.Linear(math.prod(shapes["teacher"]), self.feat_dim)
        generator = torch.Generator().manual_seed(self.seed)
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("memory_student", "memory_teacher"):
            bank = torch.rand(num_samples, self.feat_dim, generator=generator) * (2 * bound) - bound
            self.register_buffer(name, bank)
        # Z of each direction: < 0 until the first batch fixes it; saved with the banks.
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        # the sampler's state, advanced by each training step (uint8 bytes of a CPU torch.Generator)
        self.register_buffer("sampler_state", generator.get_state())

    @property
    def negatives(self) -> int:
        return min(self.nce_k, self.num_samples - 1)

    def contrast_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(batch, 1 + negatives) bank rows: each sample's own row, then rows drawn uniformly
        among the others, from the sampler's current state (which this leaves as it is)."""
        return self._draw(indices)[0]

    def _draw(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator()
        generator.set_state(self.sampler_state.cpu())
        own = indices.detach().long().cpu().view(-1, 1)
        # draw from N - 1 values and skip the sample's own row: never a positive among the negatives
        drawn = torch.randint(0, self.num_samples - 1, (own.shape[0], self.negatives), generator=generator)
        drawn += (drawn >= own).long()
        return torch.cat([own, drawn], dim=1).to(self.memory_student.device), generator.get_state()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if not self.num_samples:
            raise KdqError("crd: call setup(student_shape, teacher_shape, num_samples) before the first batch")
        if indices is None:
            raise KdqError("crd needs each sample's row in the training set (indices) to use its memory bank; "
                           "the data loader must yield them")
        indices = indices.reshape(-1).long().to(self.memory_student.device)
        if indices.numel() != student.shape[0] or indices.numel() != teacher.shape[0]:
            raise KdqError(f"crd: {indices.numel()} indices for a batch of {student.shape[0]} student and "
                           f"{teacher.shape[0]} teacher embeddings")
        if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < self.num_samples):
            raise KdqError(f"crd: sample indices must lie in [0, {self.num_samples}) (the training set the memory "
                           f"bank was sized for), got {int(indices.min())}..{int(indices.max())}")
        rows, next_state = self._draw(indices)
        with torch.autocast(device_type=student.device.type, enabled=False):
            dtype = self.embed_student.weight.dtype
            e_s = F.normalize(self.embed_student(student.reshape(student.shape[0], -1).to(dtype)), dim=1)
            e_t = F.normalize(self.embed_teacher(teacher.reshape(teacher.shape[0], -1).to(dtype)), dim=1)
            # each side is scored against the other side's bank (the banks take no gradient)
            score_s = self._scores(e_s, self.memory_teacher, rows, self.z_student)
            score_t = self._scores(e_t, self.memory_student, rows, self.z_teacher)
            loss = self._nce(score_s) + self._nce(score_t)
            if self.training:
                with torch.no_grad():
                    self._update(self.memory_student, indices, e_s)
                    self._update(self.memory_teacher, indices, e_t)
                    self.sampler_state.copy_(next_state)
        return {"loss": loss, "crd": loss}

    def _scores(self, e: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """exp(e . bank[rows] / T) / Z, (batch, 1 + negatives); sets Z on the first call."""
        if rows.numel() >= bank.shape[0]:
            # every row scored at once, then picked: one matmul beats gathering (batch, 1 + K, feat_dim)
            # rows once the draws outnumber the bank (4x faster at 60000 rows, K 4096, batch 64); a
            # copy, as backward needs the bank as it was before this step's in-place update
            dots = (e @ bank.to(e.dtype, copy=True).t()).gather(1, rows)
        else:
            dots = torch.einsum("bkd,bd->bk", bank[rows].to(e.dtype), e)
        scores = torch.exp(dots / self.nce_t)
        if z.item() < 0:
            z.fill_(scores.detach().mean().item() * self.num_samples)
        return scores / z.to(e.dtype)

    def _nce(self, scores: torch.Tensor) -> torch.Tensor:
        """The NCE loss of the reference: positive in column 0, negatives after it."""
        noise = (scores.shape[1] - 1) / self.num_samples  # K * P_n, P_n the uniform noise 1/N
        positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + _EPS))
        negative = torch.log(noise / (scores[:, 1:] + noise + _EPS))
        return -(positive.sum() + negative.sum()) / scores.shape[0]

    def _update(self, bank: torch.Tensor, indices: torch.Tensor, e: torch.Tensor) -> None:
        moved = bank[indices] * self.nce_m + e.detach().to(bank.dtype) * (1 - self.nce_m)
        bank.index_copy_(0, indices, F.normalize(moved, dim=1))
