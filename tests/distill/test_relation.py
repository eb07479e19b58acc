import numpy as np
import pytest
import torch

from kdq.distill import LOSSES
from kdq.distill.relation import PKTLoss, RKDLoss, SPLoss
from kdq.errors import KdqError

Y = torch.zeros(6, dtype=torch.long)  # relation losses ignore the labels


# ---- independent computations, NumPy and plain loops only


def _sp_np(fs, ft):
    b = fs.shape[0]
    fs, ft = fs.reshape(b, -1), ft.reshape(b, -1)
    gs, gt = fs @ fs.T, ft @ ft.T
    gs = gs / np.linalg.norm(gs, axis=1, keepdims=True)
    gt = gt / np.linalg.norm(gt, axis=1, keepdims=True)
    return ((gs - gt) ** 2).sum() / b**2


def _huber(x):
    x = np.abs(x)
    return np.where(x < 1, 0.5 * x * x, x - 0.5)


def _rkd_np(s, t):
    b = len(s)

    def dist(x):
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(b)] for i in range(b)])
        return d / d[~np.eye(b, dtype=bool)].mean()  # mean over the pairs of distinct samples

    def unit(v):
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def angles(x):
        return np.array([unit(x[j] - x[i]) @ unit(x[k] - x[i])
                         for i in range(b) for j in range(b) for k in range(b)])

    return _huber(dist(s) - dist(t)).mean(), _huber(angles(s) - angles(t)).mean()


def _pkt_np(s, t, eps=1e-7):
    def probs(x):
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        sim = (x @ x.T + 1) / 2
        return sim / sim.sum(axis=1, keepdims=True)

    p, q = probs(t), probs(s)
    return (p * np.log((p + eps) / (q + eps))).sum() / len(s) ** 2


def _rand(*shape, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).float()


# ---- values


def test_registered_with_contract():
    for name, cls, reads, weight in (("sp", SPLoss, "features", 3000.0), ("rkd", RKDLoss, "embedding", 1.0),
                                     ("pkt", PKTLoss, "embedding", 30000.0)):
        assert LOSSES.get(name) is cls
        assert (cls.family, cls.reads, cls.includes_ce, cls.default_weight) == ("relation", reads, False, weight)
        assert cls.paper and cls.__doc__


def test_sp_matches_numpy_last_and_all():
    # widths and resolutions differ inside a pair: only the batch size matters
    fs = [_rand(6, 4, 5, 5, seed=0), torch.relu(_rand(6, 8, 3, 3, seed=1))]
    ft = [_rand(6, 7, 5, 5, seed=2), torch.relu(_rand(6, 16, 2, 2, seed=3))]
    per_pair = [_sp_np(s.numpy(), t.numpy()) for s, t in zip(fs, ft)]
    last = SPLoss()(fs, ft, Y)
    assert last["loss"].item() == pytest.approx(per_pair[-1], rel=1e-5)
    assert last["sp"].item() == last["loss"].item()
    assert SPLoss(layers="all")(fs, ft, Y)["loss"].item() == pytest.approx(sum(per_pair), rel=1e-5)


def test_rkd_matches_numpy():
    s, t = _rand(6, 5, seed=4), _rand(6, 9, seed=5)
    distance, angle = _rkd_np(s.numpy().astype(np.float64), t.numpy().astype(np.float64))
    out = RKDLoss(distance_weight=2.0, angle_weight=3.0)(s, t, Y)
    assert out["rkd_distance"].item() == pytest.approx(distance, rel=1e-4)
    assert out["rkd_angle"].item() == pytest.approx(angle, rel=1e-4)
    assert out["loss"].item() == pytest.approx(2 * distance + 3 * angle, rel=1e-4)
    assert distance > 0 and angle > 0


def test_rkd_distance_reaches_huber_linear_part():
    # a teacher with one far outlier makes normalised distances differ by more than 1
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [40.0, 40.0]])
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    distance, angle = _rkd_np(s.numpy().astype(np.float64), t.numpy().astype(np.float64))
    out = RKDLoss()(s, t, Y)
    assert out["rkd_distance"].item() == pytest.approx(distance, rel=1e-4)
    assert out["rkd_angle"].item() == pytest.approx(angle, rel=1e-4)


def test_pkt_matches_numpy():
    s, t = _rand(6, 5, seed=6), _rand(6, 11, seed=7)
    out = PKTLoss()(s, t, Y)
    expected = _pkt_np(s.numpy().astype(np.float64), t.numpy().astype(np.float64))
    assert expected > 0
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert out["pkt"].item() == out["loss"].item()


def test_invariant_to_scale_rotation_and_width():
    # the student sees the teacher's batch rotated, scaled and padded to another width:
    # every relation (Gram rows, normalised distances, angles, cosines) is the same
    t = _rand(8, 6, seed=8)
    q, _ = torch.linalg.qr(_rand(6, 6, seed=9))
    s = torch.cat([3.0 * t @ q, torch.zeros(8, 4)], dim=1)
    assert SPLoss()([s], [t], Y)["loss"].item() == pytest.approx(0.0, abs=1e-6)
    out = RKDLoss()(s, t, Y)
    assert out["rkd_distance"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["rkd_angle"].item() == pytest.approx(0.0, abs=1e-6)
    assert PKTLoss()(s, t, Y)["loss"].item() == pytest.approx(0.0, abs=1e-6)
    # and RKD ignores a translation, unlike SP and PKT whose relations are about the origin
    out = RKDLoss()(t + 5.0, t, Y)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-5)
    assert SPLoss()([t + 5.0], [t], Y)["loss"].item() > 1e-3


def test_batch_of_one_is_finite():
    # a last batch of one sample: no pair to relate, the terms are 0 (the reference gives NaN for RKD)
    s, t = torch.randn(1, 4, requires_grad=True), torch.randn(1, 3)
    for loss in (RKDLoss()(s, t, Y[:1]), PKTLoss()(s, t, Y[:1]), SPLoss()([s], [t], Y[:1])):
        assert loss["loss"].item() == pytest.approx(0.0, abs=1e-6)
        loss["loss"].backward()
        assert torch.isfinite(s.grad).all()


def test_float32_under_autocast():
    # bf16 autocast would run the Gram / cosine matmuls in 16 bits; the losses opt out
    s, t = _rand(8, 32, seed=10), _rand(8, 16, seed=11)
    fs, ft = [_rand(8, 4, 6, 6, seed=12)], [_rand(8, 3, 6, 6, seed=13)]
    plain = [RKDLoss()(s, t, Y)["loss"], PKTLoss()(s, t, Y)["loss"], SPLoss()(fs, ft, Y)["loss"]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = [RKDLoss()(s, t, Y)["loss"], PKTLoss()(s, t, Y)["loss"], SPLoss()(fs, ft, Y)["loss"]]
    for a, b in zip(plain, mixed):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b)


# ---- gradients


@pytest.mark.parametrize("make", [lambda: RKDLoss(), lambda: PKTLoss(), lambda: RKDLoss(distance_weight=0)])
def test_embedding_gradcheck(make):
    loss = make()
    t = _rand(5, 4, seed=14).double()
    s = _rand(5, 3, seed=15).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, t, Y[:5])["loss"], (s,))


@pytest.mark.parametrize("layers", ["last", "all"])
def test_sp_gradcheck(layers):
    loss = SPLoss(layers=layers)
    ft = [_rand(4, 2, 3, 3, seed=16).double(), _rand(4, 3, 2, 2, seed=17).double()]
    s0 = _rand(4, 2, 3, 3, seed=18).double().requires_grad_(True)
    s1 = _rand(4, 5, 2, 2, seed=19).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: loss([a, b], ft, Y[:4])["loss"], (s0, s1))
    grads = torch.autograd.grad(loss([s0, s1], ft, Y[:4])["loss"], (s0, s1), allow_unused=True)
    assert (grads[0] is None) == (layers == "last")  # "last" leaves earlier pairs untouched


def test_training_reduces_relation_losses():
    # a few gradient steps on the student's embedding bring its relations toward the teacher's
    t = _rand(8, 6, seed=20)
    for loss in (RKDLoss(), PKTLoss()):
        s = _rand(8, 4, seed=21).requires_grad_(True)
        opt = torch.optim.SGD([s], lr=0.05 if isinstance(loss, RKDLoss) else 500.0)
        first = loss(s, t, Y[:8])["loss"].item()
        for _ in range(50):
            opt.zero_grad()
            loss(s, t, Y[:8])["loss"].backward()
            opt.step()
        assert loss(s, t, Y[:8])["loss"].item() < 0.5 * first


# ---- bad options


@pytest.mark.parametrize("make", [
    lambda: SPLoss(layers="first"),
    lambda: SPLoss(layers=2),
    lambda: RKDLoss(distance_weight=-1),
    lambda: RKDLoss(angle_weight=float("inf")),
    lambda: RKDLoss(angle_weight="50"),
    lambda: RKDLoss(distance_weight=0, angle_weight=0),
])
def test_bad_options_refused(make):
    with pytest.raises(KdqError) as err:
        make()
    assert "\n" not in str(err.value)
