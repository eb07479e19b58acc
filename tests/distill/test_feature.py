import numpy as np
import pytest
import torch
from torch import nn

from kdq.distill import LOSSES
from kdq.distill.feature import AttentionLoss, FitNetLoss
from kdq.errors import KdqError

Y = torch.zeros(2, dtype=torch.long)  # targets: unused by feature methods


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ---- NumPy references, written from the formulas in the docstrings


def _np_attention(f: np.ndarray, p: float = 2.0) -> np.ndarray:
    q = (np.abs(f) ** p).mean(axis=1).reshape(f.shape[0], -1)
    return q / np.maximum(np.sqrt((q * q).sum(axis=1, keepdims=True)), 1e-12)


def _np_pool(f: np.ndarray, h: int, w: int) -> np.ndarray:
    b, c, H, W = f.shape
    return f.reshape(b, c, h, H // h, w, W // w).mean(axis=(3, 5))


def _np_at(student: list[np.ndarray], teacher: list[np.ndarray], p: float = 2.0) -> float:
    total = 0.0
    for s, t in zip(student, teacher):
        h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
        s, t = _np_pool(s, h, w), _np_pool(t, h, w)
        total += ((_np_attention(s, p) - _np_attention(t, p)) ** 2).mean()
    return total


def _np_batchnorm(y: np.ndarray, bn: nn.BatchNorm2d) -> np.ndarray:
    mean = y.mean(axis=(0, 2, 3), keepdims=True)
    var = y.var(axis=(0, 2, 3), keepdims=True)  # biased, as batch norm normalises in training
    g, b = _np(bn.weight).reshape(1, -1, 1, 1), _np(bn.bias).reshape(1, -1, 1, 1)
    return (y - mean) / np.sqrt(var + bn.eps) * g + b


def _np_conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray, stride: int, pad: int) -> np.ndarray:
    b, _, H, W = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    out = np.zeros((b, o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
            out[:, :, i, j] = np.einsum("bchw,ochw->bo", patch, w)
    return out + bias.reshape(1, -1, 1, 1)


def _np_conv_transpose(x: np.ndarray, w: np.ndarray, bias: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Each input pixel scatters its kernel-weighted copy into the output; then crop the padding."""
    b, _, H, W = x.shape
    _, o, k, _ = w.shape  # (in, out, k, k)
    full = np.zeros((b, o, (H - 1) * stride + k, (W - 1) * stride + k))
    for i in range(H):
        for j in range(W):
            spread = np.einsum("bc,cokl->bokl", x[:, :, i, j], w)
            full[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += spread
    return full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad] + bias.reshape(1, -1, 1, 1)


# ---- registry


def test_registered_with_reference_defaults():
    fit, at = LOSSES.get("fitnet"), LOSSES.get("at")
    assert (fit, at) == (FitNetLoss, AttentionLoss)
    assert (fit.family, fit.reads, fit.includes_ce, fit.default_weight) == ("feature", "features", False, 100.0)
    assert (at.family, at.reads, at.includes_ce, at.default_weight) == ("feature", "features", False, 1000.0)
    assert "FitNets" in fit.paper and "Attention Transfer" in at.paper


# ---- attention transfer


def test_at_matches_numpy():
    torch.manual_seed(0)
    s = [torch.randn(3, 4, 6, 6), torch.randn(3, 8, 8, 4), torch.randn(3, 2, 4, 4)]
    t = [torch.randn(3, 7, 6, 6), torch.randn(3, 16, 4, 2), torch.randn(3, 5, 8, 8)]  # widths differ; pairs 2, 3 pool
    out = AttentionLoss()(s, t, Y)
    expected = _np_at([_np(x) for x in s], [_np(x) for x in t])
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["at"].item() == pytest.approx(expected, rel=1e-5)


def test_at_odd_p_uses_magnitudes():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = AttentionLoss(p=1.0)([s], [t], Y)
    assert out["loss"].item() == pytest.approx(_np_at([_np(s)], [_np(t)], 1.0), rel=1e-5)


def test_at_sums_pairs_and_averages_positions():
    # one pair twice -> twice the loss; a pair's loss is the mean over batch * positions, not the sum
    torch.manual_seed(2)
    s, t = torch.rand(2, 3, 5, 5), torch.rand(2, 3, 5, 5)
    one = AttentionLoss()([s], [t], Y)["loss"]
    assert AttentionLoss()([s, s], [t, t], Y)["loss"].item() == pytest.approx(2 * one.item(), rel=1e-6)
    a_s = _np_attention(_np(s))
    a_t = _np_attention(_np(t))
    assert one.item() == pytest.approx(((a_s - a_t) ** 2).sum() / (2 * 25), rel=1e-5)


def test_at_ignores_scale_and_width():
    torch.manual_seed(3)
    t = torch.randn(4, 3, 6, 6)
    s = torch.cat([t, t], dim=1) * 5.0  # twice the channels, five times the scale: same attention map
    assert AttentionLoss()([s], [t], Y)["loss"].item() == pytest.approx(0.0, abs=1e-7)


def test_at_gradcheck():
    torch.manual_seed(4)
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    s2 = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    t, t2 = torch.randn(2, 5, 4, 4, dtype=torch.float64), torch.randn(2, 2, 2, 2, dtype=torch.float64)
    loss = AttentionLoss()
    assert torch.autograd.gradcheck(lambda a, b: loss([a, b], [t, t2], Y)["loss"], (s, s2))


def test_at_float32_under_half_inputs():
    s, t = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    assert AttentionLoss()([s], [t], Y)["loss"].dtype == torch.float32


@pytest.mark.parametrize("p", [0, -1, float("inf"), float("nan"), "2", True, None])
def test_at_bad_options(p):
    with pytest.raises(KdqError, match="p must be"):
        AttentionLoss(p=p)


def test_at_setup_refuses_unpoolable_pairs():
    loss = AttentionLoss()
    loss.setup([(4, 8, 8), (4, 8, 4)], [(6, 4, 4), (4, 16, 8)], 10)  # both pool (one side each); fine
    with pytest.raises(KdqError, match=r"feature pair 1: .*larger .* on one axis .*--feature"):
        loss.setup([(4, 8, 8), (4, 8, 2)], [(6, 4, 4), (4, 4, 8)], 10)
    with pytest.raises(KdqError, match=r"feature pair 0: .*\(channels, h, w\)"):
        loss.setup([(16,)], [(16,)], 10)
    with pytest.raises(KdqError, match="pair them one to one"):
        loss.setup([(4, 8, 8)], [], 10)
    assert not list(loss.parameters())


# ---- FitNets


def test_fitnet_identity_pairs_match_numpy():
    torch.manual_seed(5)
    s = [torch.randn(3, 4, 5, 5), torch.randn(3, 7)]
    t = [torch.randn(3, 4, 5, 5), torch.randn(3, 7)]
    loss = FitNetLoss()
    loss.setup([(4, 5, 5), (7,)], [(4, 5, 5), (7,)], 10)
    assert not list(loss.parameters())  # shapes match: no adapter
    out = loss(s, t, Y)
    expected = sum(((_np(a) - _np(b)) ** 2).mean() for a, b in zip(s, t))
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["hint"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("s_shape, t_shape, stride, mode", [
    ((3, 4, 4), (5, 4, 4), 1, "down"),   # 1x1 conv
    ((3, 6, 6), (5, 3, 3), 2, "down"),   # 3x3 stride 2, padding 1
    ((3, 3, 3), (5, 6, 6), 2, "up"),     # transposed 4x4 stride 2, padding 1
])
def test_fitnet_conv_adapter_matches_numpy(s_shape, t_shape, stride, mode):
    torch.manual_seed(6)
    loss = FitNetLoss()
    loss.setup([s_shape], [t_shape], 10)
    conv, bn = loss.adapters[0][0], loss.adapters[0][1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    s, t = torch.randn(4, *s_shape), torch.randn(4, *t_shape)
    out = loss([s], [t], Y)
    w, b = _np(conv.weight), _np(conv.bias)
    if mode == "down":
        y = _np_conv(_np(s), w, b, stride, (w.shape[2] - 1) // 2)
    else:
        y = _np_conv_transpose(_np(s), w, b, stride, 1)
    expected = ((_np_batchnorm(y, bn) - _np(t)) ** 2).mean()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_fitnet_linear_adapter_matches_numpy():
    torch.manual_seed(7)
    loss = FitNetLoss()
    loss.setup([(6,)], [(4,)], 10)
    lin = loss.adapters[0][0]
    assert isinstance(lin, nn.Linear)
    s, t = torch.randn(5, 6), torch.randn(5, 4)
    expected = ((_np(s) @ _np(lin.weight).T + _np(lin.bias) - _np(t)) ** 2).mean()
    assert loss([s], [t], Y)["loss"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("s_hw, t_hw", [((8, 8), (8, 8)), ((8, 8), (4, 4)), ((12, 12), (4, 4)), ((16, 8), (4, 4)),
                                        ((8, 4), (4, 4)), ((4, 4), (8, 8)), ((2, 2), (6, 6)), ((2, 4), (8, 8)),
                                        ((3, 5), (12, 5))])
def test_fitnet_adapter_reaches_teacher_shape(s_hw, t_hw):
    loss = FitNetLoss()
    loss.setup([(3, *s_hw)], [(5, *t_hw)], 10)
    assert loss.adapters[0](torch.randn(2, 3, *s_hw)).shape == (2, 5, *t_hw)


def test_fitnet_adapters_are_parameters_after_setup():
    loss = FitNetLoss()
    assert not list(loss.parameters())
    loss.setup([(4, 8, 8), (8, 4, 4), (6,)], [(8, 8, 8), (8, 4, 4), (3,)], 10)
    holder = nn.ModuleDict({"fitnet": loss})  # as the objective holds it: its parts train and checkpoint
    keys = holder.state_dict().keys()
    assert "fitnet.adapters.0.0.weight" in keys and "fitnet.adapters.0.1.running_mean" in keys
    assert "fitnet.adapters.2.0.weight" in keys
    assert not any(k.startswith("fitnet.adapters.1.") for k in keys)  # equal shapes: identity
    assert all(p.requires_grad for p in holder.parameters())


def test_fitnet_reference_adapter_options():
    loss = FitNetLoss(always_adapt=True, relu=True)
    loss.setup([(4, 8, 8), (6,)], [(4, 8, 8), (6,)], 10)
    assert [type(m) for m in loss.adapters[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]  # RepDistiller's ConvReg
    assert [type(m) for m in loss.adapters[1]] == [nn.Linear, nn.ReLU]
    assert loss.adapters[0][0].kernel_size == (1, 1)


def test_fitnet_adapter_learns():
    # a few steps on the hint alone shrink it: the adapter and the student feature both get gradients
    torch.manual_seed(8)
    loss = FitNetLoss()
    loss.setup([(2, 4, 4)], [(3, 2, 2)], 10)
    s = torch.randn(8, 2, 4, 4, requires_grad=True)
    t = torch.randn(8, 3, 2, 2)
    opt = torch.optim.SGD([s, *loss.parameters()], lr=0.1)
    first = None
    for _ in range(30):
        value = loss([s], [t], Y)["loss"]
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < 0.5 * first


def test_fitnet_gradcheck():
    torch.manual_seed(9)
    loss = FitNetLoss()
    loss.setup([(2, 4, 4), (3,), (2, 2, 2)], [(3, 2, 2), (2,), (2, 2, 2)], 10)
    loss.double()
    s = (torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True),
         torch.randn(3, 3, dtype=torch.float64, requires_grad=True),
         torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True))
    t = [torch.randn(3, 3, 2, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64),
         torch.randn(3, 2, 2, 2, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: loss(list(a), t, Y)["loss"], s)


def test_fitnet_float32_under_half_inputs():
    loss = FitNetLoss()
    loss.setup([(3, 4, 4)], [(5, 4, 4)], 10)
    out = loss([torch.randn(2, 3, 4, 4).bfloat16()], [torch.randn(2, 5, 4, 4).bfloat16()], Y)
    assert out["loss"].dtype == torch.float32


@pytest.mark.parametrize("kwargs", [{"always_adapt": "yes"}, {"always_adapt": 1}, {"relu": None}, {"relu": 0}])
def test_fitnet_bad_options(kwargs):
    with pytest.raises(KdqError, match="must be true or false"):
        FitNetLoss(**kwargs)


@pytest.mark.parametrize("s_shape, t_shape, why", [
    ((4, 8, 8), (8, 3, 3), "integer multiples"),
    ((4, 8, 4), (4, 4, 8), "integer multiples"),   # larger on one axis, smaller on the other
    ((4, 6, 6), (4, 4, 4), "integer multiples"),
    ((4, 8, 8), (16,), "cannot be bridged"),
    ((4, 8), (4, 6), "cannot be bridged"),
])
def test_fitnet_refuses_unbridgeable_pair(s_shape, t_shape, why):
    loss = FitNetLoss()
    with pytest.raises(KdqError, match=rf"feature pair 1: student .* and teacher .*{why}.*--feature"):
        loss.setup([(4, 4, 4), s_shape], [(4, 4, 4), t_shape], 10)


def test_fitnet_needs_setup_for_differing_shapes():
    with pytest.raises(RuntimeError, match="setup"):
        FitNetLoss()([torch.randn(2, 3, 4, 4)], [torch.randn(2, 5, 4, 4)], Y)


def test_float32_under_autocast():
    fit, at = FitNetLoss(), AttentionLoss()
    fit.setup([(3, 4, 4)], [(5, 2, 2)], 10)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fit([s], [t], Y)["loss"].dtype == torch.float32
        assert at([s], [t], Y)["loss"].dtype == torch.float32
