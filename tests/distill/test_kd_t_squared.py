"""kd's `t_squared` option: Hinton's T^2 on the soft term (default), or none (issue 13's seed)."""

from __future__ import annotations

import math

import pytest
import torch

from kdq.config import parse_experiment
from kdq.distill import KDLoss, method_losses, method_spec
from kdq.errors import KdqError

# student logits (0, 0) and teacher logits (2 ln 3, 0) at T = 2: p_teacher = (3/4, 1/4), p_student = (1/2, 1/2)
STUDENT = torch.tensor([[0.0, 0.0]])
TEACHER = torch.tensor([[2 * math.log(3.0), 0.0]])
LABEL = torch.tensor([0])
KL = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812...
CE = math.log(2.0)  # -log softmax((0, 0))[0]


def test_hand_values_with_and_without_t_squared():
    assert KL == pytest.approx(0.1308120)
    hinton = KDLoss(2.0, 0.5)(STUDENT, TEACHER, LABEL)
    plain = KDLoss(2.0, 0.5, t_squared=False)(STUDENT, TEACHER, LABEL)
    assert hinton["kd"].item() == pytest.approx(4 * KL, rel=1e-5)
    assert hinton["loss"].item() == pytest.approx(0.6081975, rel=1e-5)  # 0.5 * 4 * KL + 0.5 * CE
    assert plain["kd"].item() == pytest.approx(KL, rel=1e-5)
    assert plain["loss"].item() == pytest.approx(0.4119795, rel=1e-5)  # 0.5 * KL + 0.5 * CE
    assert plain["ce"].item() == pytest.approx(CE, rel=1e-6) == hinton["ce"].item()


def test_matches_the_seeds_formula_with_alpha_flipped():
    # seed 003: loss = a * CE(y, p_s) + (1 - a) * mean_i sum_c p_t log(p_t / p_s) at temperature T, no T^2;
    # written here on logits (the seed applies its softmax to probabilities, which kdq does not copy)
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    T, seed_alpha = 2.0, 0.3
    p_t, p_s = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    kl = (p_t * (p_t / p_s).log()).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(5), y].mean()
    seed_loss = seed_alpha * ce + (1 - seed_alpha) * kl
    ours = KDLoss(T, alpha=1 - seed_alpha, t_squared=False)(s, t, y)["loss"]
    assert ours.item() == pytest.approx(seed_loss.item(), rel=1e-5)
    assert KDLoss(T, alpha=1 - seed_alpha)(s, t, y)["loss"].item() != pytest.approx(seed_loss.item(), rel=1e-3)


def test_gradient_without_t_squared_shrinks_by_t():
    # d KL / ds = (softmax(s/T) - softmax(t/T)) / T per sample: T^2 times smaller than Hinton's
    torch.manual_seed(1)
    s, t, T = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6), 3.0
    KDLoss(T, 1.0, t_squared=False)(s, t, torch.zeros(4, dtype=torch.long))["loss"].backward()
    expected = (torch.softmax(s.detach() / T, 1) - torch.softmax(t / T, 1)) / T / 4
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value", ["false", 0, None, 1.0])
def test_t_squared_must_be_a_bool(value):
    with pytest.raises(KdqError, match="t_squared must be true or false"):
        KDLoss(t_squared=value)


def test_reaches_kd_through_method_options_cli_and_yaml():
    (loss, weight), = method_losses({"kd": {"t_squared": False}}, temperature=2.0, alpha=0.5).values()
    assert loss.t_squared is False and loss.temperature == 2.0 and loss.alpha == 0.5 and weight == 1.0
    assert method_losses("kd")["kd"][0].t_squared is True  # Hinton's stays the default
    assert method_spec(["kd"], ["kd.t_squared=false"]) == {"kd": {"t_squared": False}}
    stages = {"t": {"model": "mlp"}, "s": {"kind": "distill", "model": "mlp-small", "teacher": "t",
                                          "method": {"kd": {"t_squared": 1}}}}
    with pytest.raises(KdqError, match="stage 's': t_squared must be true or false, got 1"):
        parse_experiment({"data": {"name": "synthetic"}, "stages": stages})
