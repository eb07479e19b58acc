import math

import pytest
import torch

from kdq.distill import KDLoss
from kdq.errors import KdqError


def _softmax(values, t):
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def _by_hand(student, teacher, label, t, alpha):
    """The Hinton loss for one sample, written out with scalar math only."""
    p = _softmax(teacher, t)
    q = _softmax(student, t)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = -math.log(_softmax(student, 1.0)[label])
    return alpha * t * t * kl + (1 - alpha) * ce, t * t * kl, ce


def test_matches_hand_computation():
    s = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
    t = [[2.0, 1.0, 0.0], [0.0, 0.0, 4.0]]
    y = [1, 2]
    out = KDLoss(temperature=2.0, alpha=0.5)(torch.tensor(s), torch.tensor(t), torch.tensor(y))
    expected = [_by_hand(si, ti, yi, 2.0, 0.5) for si, ti, yi in zip(s, t, y)]
    for key, col in (("loss", 0), ("kd", 1), ("ce", 2)):
        mean = sum(e[col] for e in expected) / len(expected)  # averaged per sample
        assert out[key].item() == pytest.approx(mean, rel=1e-5)


def test_golden_value():
    # Pre-computed once with the scalar formula above (T=4, alpha=0.7).
    out = KDLoss(4.0, 0.7)(torch.tensor([[3.0, 1.0, -2.0]]), torch.tensor([[1.0, 2.5, 0.0]]), torch.tensor([0]))
    loss, kd, ce = _by_hand([3.0, 1.0, -2.0], [1.0, 2.5, 0.0], 0, 4.0, 0.7)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert kd > 0 and out["kd"].item() == pytest.approx(kd, rel=1e-5)


def test_zero_kd_when_student_equals_teacher():
    logits = torch.randn(8, 5)
    out = KDLoss(3.0, 1.0)(logits, logits.clone(), torch.zeros(8, dtype=torch.long))
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_matches_closed_form():
    # d(T^2 KL)/ds = T * (softmax(s/T) - softmax(t/T)) per sample, divided by the batch size.
    torch.manual_seed(0)
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6)
    T = 3.0
    KDLoss(T, alpha=1.0)(s, t, torch.zeros(4, dtype=torch.long))["loss"].backward()
    expected = T * (torch.softmax(s.detach() / T, 1) - torch.softmax(t / T, 1)) / 4
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)


def test_t_squared_keeps_gradient_scale():
    # Without T^2 the soft gradient would shrink ~1/T^2 at high T; with it, it stays within a small factor.
    torch.manual_seed(1)
    s0 = torch.randn(16, 10) * 0.1
    t = torch.randn(16, 10) * 0.1
    norms = []
    for T in (4.0, 16.0):
        s = s0.clone().requires_grad_(True)
        KDLoss(T, 1.0)(s, t, torch.zeros(16, dtype=torch.long))["loss"].backward()
        norms.append(s.grad.norm().item())
    assert 0.5 < norms[1] / norms[0] < 2.0


def test_soft_targets_accepted():
    probs = torch.full((3, 4), 0.25)
    out = KDLoss(2.0, 0.5)(torch.randn(3, 4), torch.randn(3, 4), probs)
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"temperature": -1}, {"alpha": 1.5}, {"alpha": -0.1}])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(KdqError):
        KDLoss(**kwargs)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": float("inf")}, "temperature must be > 0 and finite, got inf"),
    ({"temperature": float("nan")}, "temperature must be > 0 and finite, got nan"),
    ({"temperature": "hot"}, "temperature must be > 0 and finite, got 'hot'"),
    ({"alpha": float("nan")}, "alpha must be in [0, 1], got nan"),
    ({"alpha": float("inf")}, "alpha must be in [0, 1], got inf"),
])
def test_infinite_and_nan_hyperparameters_are_refused_by_name(kwargs, words):
    # inf passes `temperature > 0` and trains to nan: it must be refused before any training
    with pytest.raises(KdqError) as info:
        KDLoss(**kwargs)
    assert str(info.value) == words
