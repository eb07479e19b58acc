"""Relation-based distillation: the student keeps the relations the teacher sees between the
samples of a batch (similarities, distances, angles), not the teacher's values themselves.

Every relation is a batch x batch (or batch^3) table, so student and teacher widths may differ
and nothing is trained besides the student: no adapter, no `setup`. All math runs in float32
(float64 stays float64) with autocast switched off: the Gram and cosine matrices are sums over
thousands of products, which overflow or lose their small entries in float16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdq.distill.methods import DistillLoss, check_non_negative, register
from kdq.errors import KdqError


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(batch, ...) -> (batch, features) in float32 at least (float64 kept for gradient checks)."""
    x = x.flatten(1)
    return x if x.dtype == torch.float64 else x.float()


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


# ---- similarity-preserving


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||G_s - G_t||_F^2 / b^2 with G = f f^T over the batch, each row L2-normalised."""
    fs, ft = _flat(student), _flat(teacher)
    b = fs.shape[0]
    gs = F.normalize(fs @ fs.t(), dim=1)
    gt = F.normalize(ft @ ft.t(), dim=1)
    return (gs - gt).pow(2).sum() / (b * b)


@register("sp", "relation", "features", default_weight=3000.0,
          paper="Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019")
class SPLoss(DistillLoss):
    """Similarity-preserving distillation: inputs the teacher finds alike, the student should too.

    Per tapped layer pair, with f each sample's activations flattened (b samples in the batch):

        G = f f^T (b x b), each row divided by its L2 norm
        sp = ||G_student - G_teacher||_F^2 / b^2

    summed over the pairs used (Tung & Mori, ICCV 2019: the paper sums over a set of layer
    pairs). `layers="last"` (default) uses only the last tapped pair - with the zoo's default
    taps, the output of the deepest stage, before pooling - which is what the reference
    implementations do (RepDistiller's train_student.py passes one pair, the last stage's
    output; mdistiller the same) and what the default weight 3000 (RepDistiller's
    run_cifar_distill.sh `-b 3000`, mdistiller `SP.LOSS.FEAT_WEIGHT`) was tuned for.
    `layers="all"` sums over every tapped pair, the paper's general form; the loss then grows
    with the number of pairs, so lower the weight to match. Channels and resolution may differ
    within a pair: only the batch size must agree. Returns `loss` and `sp` (equal).
    """

    def __init__(self, layers: str = "last") -> None:
        super().__init__()
        if layers not in ("last", "all"):
            raise KdqError(f"layers must be 'last' (the last tapped pair) or 'all' (every pair), got {layers!r}")
        self.layers = layers

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], targets: torch.Tensor,
                indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pairs = list(zip(student, teacher))
        if self.layers == "last":
            pairs = pairs[-1:]
        with _no_autocast(pairs[0][0]):
            sp = sum(similarity_loss(s, t) for s, t in pairs)
        return {"loss": sp, "sp": sp}


# ---- relational KD


def _pairwise_distance(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances, b x b, from |a|^2 + |b|^2 - 2ab clamped at `eps` before the root
    (rounding can make it slightly negative, and the root's gradient is infinite at 0); the
    diagonal is set to exactly 0 so that it carries no gradient."""
    sq = x.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp(min=eps).sqrt()
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    return d.masked_fill(eye, 0.0)


def _mean_normalised(d: torch.Tensor) -> torch.Tensor:
    """Distances divided by the mean of the positive ones (the off-diagonal entries). The mean is
    a sum over a count, not a masked mean: a batch of one has no positive distance, and 0/0
    there would turn the whole step to NaN; its distance term is 0 instead."""
    count = (d > 0).sum().clamp(min=1)
    return d / (d.sum() / count).clamp(min=1e-12)


def _angles(x: torch.Tensor) -> torch.Tensor:
    """cos of the angle at vertex i between samples j and k, for every (i, j, k): b^3 values.
    Degenerate triplets (j == i or k == i) give a zero vector, so a cosine of 0 in both models."""
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # e[i, j] = unit vector i -> j
    return torch.bmm(e, e.transpose(1, 2)).flatten()


@register("rkd", "relation", "embedding", default_weight=1.0,
          paper="Park, Kim, Lu & Cho, Relational Knowledge Distillation, CVPR 2019")
class RKDLoss(DistillLoss):
    """Relational KD: the student's embeddings keep the teacher's distances and angles.

        distance = mean over (i, j) of huber(d_s(i, j) / mu_s, d_t(i, j) / mu_t)
        angle    = mean over (i, j, k) of huber(cos_s(j, i, k), cos_t(j, i, k))
        loss     = distance_weight * distance + angle_weight * angle

    with d the Euclidean distance between two samples' embeddings (the classifier's inputs),
    mu the mean distance over the batch's pairs, cos the cosine of the angle at sample i
    between j and k, and huber the smooth L1 loss with delta 1 (Park et al., CVPR 2019;
    distance_weight 25 and angle_weight 50 are the paper's, also the defaults of
    RepDistiller and mdistiller). The paper writes its means over the pairs and triplets of
    distinct samples; the authors' code (lenscloth/RKD, copied by RepDistiller and mdistiller)
    averages over all b^2 pairs and b^3 triplets, the degenerate ones included (each 0 in both
    models, so they only dilute the mean by (b-1)/b and about (b-1)^2/b^2), clamps squared
    distances at 1e-12 before the root, sets the diagonal to 0, and takes mu over the positive
    distances. kdq follows the code, where the weights were tuned, except that a batch of one
    gives a distance term of 0 where the code gives NaN. Default weight 1: RepDistiller's
    run_cifar_distill.sh `-b 1`, mdistiller `RKD.LOSS.FEAT_WEIGHT`. Returns `loss`,
    `rkd_distance` and `rkd_angle` (the two terms before their weights).
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = check_non_negative("distance_weight", distance_weight)
        self.angle_weight = check_non_negative("angle_weight", angle_weight)
        if self.distance_weight == 0 and self.angle_weight == 0:
            raise KdqError("distance_weight and angle_weight are both 0, so rkd would teach nothing; "
                           "give one of them a positive weight (the paper: 25 and 50)")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with _no_autocast(student):
            s, t = _flat(student), _flat(teacher)
            distance = F.smooth_l1_loss(_mean_normalised(_pairwise_distance(s)),
                                        _mean_normalised(_pairwise_distance(t)))
            angle = F.smooth_l1_loss(_angles(s), _angles(t))
        loss = self.distance_weight * distance + self.angle_weight * angle
        return {"loss": loss, "rkd_distance": distance, "rkd_angle": angle}


# ---- probabilistic knowledge transfer

_PKT_EPS = 1e-7  # the reference code's: guards the norms and both sides of the log ratio


def _cosine_probabilities(x: torch.Tensor) -> torch.Tensor:
    """Row i: sample i's cosine similarities to the batch, shifted to [0, 1], summing to 1."""
    x = x / (x.norm(dim=1, keepdim=True) + _PKT_EPS)
    sim = (x @ x.t() + 1) / 2
    return sim / sim.sum(dim=1, keepdim=True)


@register("pkt", "relation", "embedding", default_weight=30000.0,
          paper="Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018")
class PKTLoss(DistillLoss):
    """Probabilistic knowledge transfer: the student matches the teacher's distribution of
    neighbours, each sample's cosine similarities to the batch read as probabilities.

        p(j|i) = (1 + cos(t_i, t_j)) / 2, normalised over j     (q likewise for the student)
        pkt    = 1/b^2 * sum over i, j of p(j|i) * log((p(j|i) + eps) / (q(j|i) + eps)),  eps = 1e-7

    i.e. KL(teacher || student) per row, averaged over rows and divided once more by b
    (Passalis & Tefas, ECCV 2018, with the cosine-similarity kernel).
    The paper writes the divergence as a plain sum over i and j; the authors' code
    (passalis/probabilistic_kt, copied by RepDistiller) takes the mean over the b^2 entries,
    keeps each sample's similarity to itself in its row, and adds eps inside the log. kdq
    follows the code: the default weight 30000 (RepDistiller's run_cifar_distill.sh
    `-b 30000`, mdistiller `PKT.LOSS.FEAT_WEIGHT`) is tuned for that scale. The code also
    zeroes NaNs after normalising; kdq lets them through, so a diverged run shows as NaN
    rather than training on zeros. Returns `loss` and `pkt` (equal).
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with _no_autocast(student):
            q = _cosine_probabilities(_flat(student))
            p = _cosine_probabilities(_flat(teacher))
            pkt = (p * torch.log((p + _PKT_EPS) / (q + _PKT_EPS))).mean()
        return {"loss": pkt, "pkt": pkt}
