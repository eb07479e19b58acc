"""Several teachers as one (Ensemble) and distillation with hidden labels (labeled_mask, Distiller's `labeled`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdq.distill import LOSSES, DistillLoss, Distiller, method_losses
from kdq.distill.objective import ce_weight, labeled_mask
from kdq.distill.teacher import Ensemble, ensemble_weights
from kdq.errors import KdqError


class _Fixed(nn.Module):
    """A teacher that returns given logits, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.logits[: len(x)]


def test_ensemble_is_the_weighted_mean_of_logits():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    x = torch.zeros(5, 1)
    torch.testing.assert_close(Ensemble([_Fixed(a), _Fixed(b)])(x), (a + b) / 2)
    torch.testing.assert_close(Ensemble([_Fixed(a), _Fixed(b)], [3, 1])(x), 0.75 * a + 0.25 * b)


def test_ensemble_skips_a_zero_weight_teacher_and_is_frozen():
    a, b = _Fixed(torch.ones(2, 3)), _Fixed(torch.zeros(2, 3))
    lin = nn.Linear(1, 3)
    ens = Ensemble([a, b, lin], [1, 0, 0]).train()
    ens(torch.zeros(2, 1))
    assert a.calls == 1 and b.calls == 0
    assert not any(p.requires_grad for p in ens.parameters())


@pytest.mark.parametrize("weights, match", [
    ([1, -1], ">= 0"), ([1, math.nan], ">= 0"), ([math.inf, 1], ">= 0"), ([0, 0], "all 0"),
    ([1], "list of 2"), ("0.5,0.5", "list of 2"), ([True, 1], ">= 0"),
])
def test_bad_teacher_weights_are_refused(weights, match):
    with pytest.raises(KdqError, match=match):
        ensemble_weights(weights, 2)


def test_feature_methods_refuse_an_ensemble():
    ens = Ensemble([nn.Identity(), nn.Identity()])
    with pytest.raises(KdqError, match="no single set of layers"):
        Distiller(ens, method_losses({"kd": 1.0, "at": 1000}), "online")
    Distiller(ens, method_losses("dkd"), "online")  # logit methods are fine


# ---- which rows keep their labels


def test_labeled_mask_is_seeded_balanced_and_sized():
    y = torch.arange(100) % 4
    mask = labeled_mask(y, 10, 4, seed=0)
    assert mask.dtype == torch.bool and int(mask.sum()) == 10
    assert sorted(torch.bincount(y[mask], minlength=4).tolist()) == [2, 2, 3, 3]
    assert torch.equal(mask, labeled_mask(y, 10, 4, seed=0))
    assert not torch.equal(mask, labeled_mask(y, 10, 4, seed=1))
    small = labeled_mask(y, 4, 4, seed=3)  # every class has one
    assert torch.bincount(y[small], minlength=4).tolist() == [1, 1, 1, 1]


def test_labeled_mask_with_unbalanced_classes_takes_what_exists():
    y = torch.tensor([0] * 2 + [1] * 20)
    assert torch.bincount(y[labeled_mask(y, 6, 2, seed=0)], minlength=2).tolist() == [2, 4]


@pytest.mark.parametrize("count", [3, 101, 2.5, True])
def test_labeled_mask_refuses_counts_out_of_range(count):
    with pytest.raises(KdqError, match="from 4 .* to 100"):
        labeled_mask(torch.arange(100) % 4, count, 4, seed=0)


# ---- the objective with hidden labels


class _NoCE(DistillLoss):
    """A logit method without CE of its own (the objective adds it): mean squared logit difference."""

    def forward(self, student, teacher, targets, indices=None):  # noqa: ANN001
        mse = ((student.float() - teacher.float()) ** 2).mean()
        return {"loss": mse, "mse": mse}


def _batch(n: int = 8, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, classes, generator=g, requires_grad=True)
    teacher = torch.randn(n, classes, generator=g)
    targets = torch.randint(classes, (n,), generator=g)
    return student, teacher, targets


def _distiller(method, teacher: torch.Tensor, labeled: torch.Tensor | None) -> Distiller:
    losses = {"mse": (_NoCE(), 1.0)} if method == "noce" else method_losses(method)
    return Distiller(_Fixed(teacher), losses, "online", labeled=labeled)


METHODS = ["kd", "dkd", "dist", "noce", {"kd": 1.0, "dist": 0.5}]


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_hidden_labels_carry_no_signal(method):
    """Shuffling (or replacing) the labels of hidden rows changes neither the loss nor its gradient."""
    student, teacher, targets = _batch()
    labeled = torch.tensor([True, False, True, False, False, True, False, False])
    idx = torch.arange(8)
    d = _distiller(method, teacher, labeled)
    out = d(student, targets, student, idx)
    (grad,) = torch.autograd.grad(out["loss"], student)
    other = targets.clone()
    other[~labeled] = (targets[~labeled] + 1 + torch.arange(int((~labeled).sum()))) % 5  # every hidden label changes
    assert not torch.equal(other, targets)
    out2 = d(student, other, student, idx)
    (grad2,) = torch.autograd.grad(out2["loss"], student)
    assert torch.equal(out["loss"], out2["loss"]) and torch.equal(grad, grad2)
    # while a labeled row's label does matter
    flipped = targets.clone()
    flipped[0] = (targets[0] + 1) % 5
    assert not torch.equal(d(student, flipped, student, idx)["loss"], out["loss"])


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_all_labeled_is_plain_distillation(method):
    student, teacher, targets = _batch(seed=1)
    idx = torch.arange(8)
    plain = _distiller(method, teacher, None)(student, targets, student, idx)
    masked = _distiller(method, teacher, torch.ones(8, dtype=torch.bool))(student, targets, student, idx)
    assert plain.keys() == masked.keys()
    for key in plain:
        torch.testing.assert_close(masked[key], plain[key])


def test_kd_with_hidden_labels_against_a_direct_computation():
    student, teacher, targets = _batch(seed=2)
    labeled = torch.tensor([True, True, False, False, True, False, False, False])
    out = _distiller("kd", teacher, labeled)(student, targets, student, torch.arange(8))
    t, alpha = 4.0, 0.7
    p_t = F.softmax(teacher / t, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(student / t, 1))).sum(1).mean() * t * t
    ce_rows = -F.log_softmax(student, 1)[torch.arange(8), targets]
    ce = ce_rows[labeled].mean()
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["loss"], alpha * kl + (1 - alpha) * ce)


def test_a_batch_without_labeled_rows_has_no_cross_entropy():
    student, teacher, targets = _batch(seed=3)
    out = _distiller("noce", teacher, torch.zeros(8, dtype=torch.bool))(student, targets, student, torch.arange(8))
    assert out["ce"].item() == 0.0 and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], out["mse"])


def test_the_mask_is_looked_up_by_training_index():
    student, teacher, targets = _batch(seed=4)
    labeled = torch.zeros(100, dtype=torch.bool)
    idx = torch.arange(50, 58)
    labeled[idx[:3]] = True  # the batch's first three rows, by their training indices
    out = _distiller("noce", teacher, labeled)(student, targets, student, idx)
    torch.testing.assert_close(out["ce"], F.cross_entropy(student[:3], targets[:3]))


@pytest.mark.parametrize("name", sorted(n for n in LOSSES.names() if LOSSES.get(n).includes_ce and
                                        LOSSES.get(n).reads == "logits"))
def test_ce_weight_is_the_ce_coefficient_of_every_method(name):
    """The rule ce_weight follows, checked on every registered method that includes CE."""
    for options in ({}, {"alpha": 0.25}):
        try:
            loss = LOSSES.get(name)(**options)
        except TypeError:
            continue
        student, teacher, targets = _batch(seed=5)
        out = loss(student, teacher, targets)
        (coefficient,) = torch.autograd.grad(out["loss"], out["ce"])
        assert coefficient.item() == pytest.approx(ce_weight(loss))


def test_labeled_refuses_mixed_targets():
    student, teacher, _ = _batch()
    d = _distiller("kd", teacher, torch.ones(8, dtype=torch.bool))
    with pytest.raises(KdqError, match="mixup"):
        d(student, torch.full((8, 5), 0.2), student, torch.arange(8))
