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


# ---- DKD and DIST

import numpy as np  # noqa: E402

from kdq.distill import LOSSES  # noqa: E402
from kdq.distill.response import DISTLoss, DKDLoss  # noqa: E402


def _np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_ce(s, y):
    return float(np.mean([-np.log(_np_softmax(s)[i, c]) for i, c in enumerate(y)]))


def _np_dkd(s, t, y, T, a, b):
    """DKD as the reference code writes it: probabilities summed into (target, rest), then
    the non-target classes renormalised by pushing the target logit down by 1000."""
    n, classes = s.shape
    gt = np.zeros_like(s)
    gt[np.arange(n), y] = 1
    ps, pt = _np_softmax(s / T), _np_softmax(t / T)
    bs = np.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = np.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum() / n * T * T
    qs, qt = _np_softmax(s / T - 1000 * gt), _np_softmax(t / T - 1000 * gt)
    keep = gt == 0
    nckd = (qt[keep] * (np.log(qt[keep]) - np.log(qs[keep]))).sum() / n * T * T
    ce = _np_ce(s, y)
    return {"loss": ce + a * tckd + b * nckd, "ce": ce, "tckd": tckd, "nckd": nckd}


def _np_pearson_loss(a, b):
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    rho = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8)
    return 1 - rho.mean()


def _np_dist(s, t, y, T, beta, gamma):
    ys, yt = _np_softmax(s / T), _np_softmax(t / T)
    inter = T * T * _np_pearson_loss(ys, yt)
    intra = T * T * _np_pearson_loss(ys.T, yt.T)
    ce = _np_ce(s, y)
    return {"loss": ce + beta * inter + gamma * intra, "ce": ce, "inter": inter, "intra": intra}


def _random_logits(seed, n=6, classes=7, scale=3.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, classes)) * scale, rng.normal(size=(n, classes)) * scale, rng.integers(0, classes, n)


@pytest.mark.parametrize("cls, reference, options", [
    (DKDLoss, _np_dkd, {"T": 4.0, "a": 1.0, "b": 8.0}),
    (DKDLoss, _np_dkd, {"T": 2.0, "a": 0.5, "b": 2.0}),
    (DISTLoss, _np_dist, {"T": 4.0, "beta": 2.0, "gamma": 2.0}),
    (DISTLoss, _np_dist, {"T": 1.0, "beta": 1.0, "gamma": 0.5}),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_reference(cls, reference, options, seed):
    s, t, y = _random_logits(seed)
    expected = reference(s, t, y, *options.values())
    names = {"T": "temperature", "a": "alpha", "b": "beta"}
    loss = cls(**{names.get(k, k): v for k, v in options.items()})
    out = loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), torch.tensor(y))
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].dtype == torch.float32
        assert out[key].item() == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_dkd_defaults_are_mdistillers_and_the_contract_holds():
    loss = LOSSES.get("dkd")()
    assert (loss.temperature, loss.alpha, loss.beta) == (4.0, 1.0, 8.0)
    registered = (DKDLoss.family, DKDLoss.reads, DKDLoss.includes_ce, DKDLoss.default_weight)
    assert registered == ("response", "logits", True, 1.0)
    s, t, y = (torch.tensor(v) for v in _random_logits(3))
    out = LOSSES.get("dkd")(temperature=3.0, alpha=0.25, beta=5.0)(s, t, y)
    torch.testing.assert_close(out["loss"], out["ce"] + 0.25 * out["tckd"] + 5.0 * out["nckd"])
    # no warm-up inside the loss: the same batch gives the same value on every call
    assert out["loss"].item() == LOSSES.get("dkd")(temperature=3.0, alpha=0.25, beta=5.0)(s, t, y)["loss"].item()


def test_dist_defaults_and_registration():
    loss = LOSSES.get("dist")()
    assert (loss.temperature, loss.beta, loss.gamma) == (4.0, 2.0, 2.0)
    registered = (DISTLoss.family, DISTLoss.reads, DISTLoss.includes_ce, DISTLoss.default_weight)
    assert registered == ("response", "logits", True, 1.0)


@pytest.mark.parametrize("cls, terms", [(DKDLoss, ("tckd", "nckd")), (DISTLoss, ("inter", "intra"))])
def test_terms_vanish_when_student_equals_teacher(cls, terms):
    s, _, y = (torch.tensor(v, dtype=torch.float32) for v in _random_logits(4))
    out = cls()(s, s.clone(), y.long())
    for key in terms:
        assert out[key].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("cls", [DKDLoss, DISTLoss])
def test_gradient_check_float64(cls):
    s, t, y = _random_logits(5, n=4, classes=5, scale=1.0)
    s = torch.tensor(s, requires_grad=True)
    t = torch.tensor(t, requires_grad=True)
    loss = cls(temperature=2.0)
    for key in ("loss", *[k for k in loss(s, t, torch.tensor(y)) if k != "loss"]):
        assert torch.autograd.gradcheck(lambda a, b: loss(a, b, torch.tensor(y))[key], (s, t))


def test_dkd_stays_finite_when_the_target_probability_rounds_to_one():
    # float32 softmax gives p_y == 1 exactly here; log(1 - p_y) of the reference's form is -inf
    s = torch.tensor([[60.0, 0.0, -3.0]], requires_grad=True)
    t = torch.tensor([[80.0, 1.0, 0.0]])
    out = DKDLoss(temperature=1.0)(s, t, torch.tensor([0]))
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.isfinite(s.grad).all()
    assert out["nckd"].item() > 0  # the non-target classes still carry a signal


def test_half_precision_logits_are_scored_in_float32():
    s, t, y = (torch.tensor(v) for v in _random_logits(6))
    for cls in (DKDLoss, DISTLoss):
        full = cls()(s.float(), t.float(), y)
        half = cls()(s.half(), t.half(), y)
        assert half["loss"].dtype == torch.float32
        assert half["loss"].item() == pytest.approx(full["loss"].item(), rel=1e-2)


def test_dkd_refuses_probability_targets():
    s, t, _ = (torch.tensor(v, dtype=torch.float32) for v in _random_logits(7))
    with pytest.raises(KdqError, match="dkd needs class-index targets"):
        DKDLoss()(s, t, torch.full((6, 7), 1 / 7))


def test_dist_accepts_probability_targets():
    s, t, _ = (torch.tensor(v, dtype=torch.float32) for v in _random_logits(8))
    out = DISTLoss()(s, t, torch.full((6, 7), 1 / 7))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("cls, kwargs, words", [
    (DKDLoss, {"temperature": 0}, "temperature must be > 0"),
    (DKDLoss, {"alpha": -1}, "alpha must be >= 0"),
    (DKDLoss, {"beta": float("nan")}, "beta must be >= 0"),
    (DKDLoss, {"beta": float("inf")}, "beta must be >= 0"),
    (DKDLoss, {"label_smoothing": 1.5}, "label_smoothing must be in [0, 1]"),
    (DISTLoss, {"temperature": "4"}, "temperature must be > 0"),
    (DISTLoss, {"beta": -0.5}, "beta must be >= 0"),
    (DISTLoss, {"gamma": True}, "gamma must be >= 0"),
])
def test_bad_dkd_and_dist_options_are_refused_by_name(cls, kwargs, words):
    with pytest.raises(KdqError) as info:
        cls(**kwargs)
    assert str(info.value).startswith(words)
