"""The low-bit quantizers: their grids, their STE gradients, exact export, and bad options."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdq.errors import KdqError
from kdq.quant.lowbit import QUANTIZERS, make_quantizer


def _distinct(t: torch.Tensor) -> int:
    return t.detach().unique().numel()


def _initialised(name: str, bits: int, role: str, **state) -> torch.nn.Module:
    """A quantizer whose learned state is set by hand, so no data-dependent init runs."""
    q = make_quantizer(name, bits, role)
    with torch.no_grad():
        for key, value in state.items():
            getattr(q, key).fill_(value)
        q.initialized.fill_(True)
    return q


def test_registry_holds_every_method():
    assert QUANTIZERS.names() == ["binary", "dorefa", "lsq", "pact", "ternary", "uniform"]


# ---- grids: how many levels, where


@pytest.mark.parametrize("bits", range(1, 9))
def test_uniform_asymmetric_uses_exactly_2_to_the_k_levels(bits):
    x = torch.linspace(0, 1, 4096)
    q = make_quantizer("uniform", bits, "weight", symmetric=False)(x)
    assert _distinct(q) == 2**bits
    assert q.min() == 0 and abs(q.max().item() - 1) < 1e-6


@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_symmetric_grid_is_zero_centred(bits):
    x = torch.linspace(-1, 1, 4096)
    q = make_quantizer("uniform", bits, "weight")(x)
    levels = q.unique()
    assert levels.numel() == 2**bits - 1  # narrow range: the lone most-negative code is unused
    assert torch.equal(levels, -levels.flip(0)) and (levels == 0).any()
    assert levels.abs().max() <= 1 + 1e-6


def test_uniform_per_channel_keeps_each_channel_range():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.01, 0.1, 1, 10]).view(4, 1, 1, 1)
    q = make_quantizer("uniform", 3, "weight", per_channel=True)(w)
    for c in range(4):
        assert _distinct(q[c]) <= 7
        assert torch.allclose(q[c].abs().max(), w[c].abs().max(), rtol=1e-6)


def test_uniform_activation_tracks_an_ema_and_freezes_in_eval():
    q = make_quantizer("uniform", 4, "activation", momentum=0.5)
    q(torch.tensor([0.0, 1.0]))  # the first batch sets the range
    assert q.running_max.item() == 1.0
    q(torch.tensor([-2.0, 3.0]))
    assert q.running_min.item() == -1.0 and q.running_max.item() == 2.0
    q.eval()
    q(torch.tensor([-9.0, 9.0]))
    assert q.running_min.item() == -1.0 and q.running_max.item() == 2.0
    out = q(torch.linspace(-5, 5, 1001))
    assert _distinct(out) == 16 and out.min() >= -1 - 1e-6 and out.max() <= 2 + 1e-6


@pytest.mark.parametrize("bits", range(2, 7))
def test_dorefa_weight_grid(bits):
    w = torch.randn(2000, generator=torch.Generator().manual_seed(bits))
    w = torch.cat([w, -w])
    q = make_quantizer("dorefa", bits, "weight")(w)
    top = 2**bits - 1
    grid = (torch.arange(top + 1) - top / 2) * (2 / top)
    assert _distinct(q) <= 2**bits and q.abs().max() <= 1 + 1e-6
    assert torch.isclose(q[:, None], grid[None]).any(1).all()
    assert torch.equal(q.unique(), -q.unique().flip(0))  # the grid is symmetric


def test_dorefa_one_bit_weights_are_sign_times_mean_magnitude():
    w = torch.tensor([0.5, -2.0, 0.1, -0.3])
    q = make_quantizer("dorefa", 1, "weight")(w)
    e = w.abs().mean()
    assert torch.allclose(q, torch.sign(w) * e)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dorefa_activations_clip_to_unit_range(bits):
    x = torch.linspace(-2, 3, 5001)
    q = make_quantizer("dorefa", bits, "activation")(x)
    assert _distinct(q) == 2**bits and q.min() == 0 and abs(q.max().item() - 1) < 1e-6


def test_pact_levels_lie_in_zero_alpha():
    q = make_quantizer("pact", 3, "activation", alpha=2.0)
    out = q(torch.linspace(-3, 5, 4001))
    assert _distinct(out) == 8 and out.min() == 0 and abs(out.max().item() - 2) < 1e-6


def test_binary_gives_two_values_per_channel():
    w = torch.tensor([[0.5, -2.0, 0.1], [-0.3, 1.0, 3.0]])
    q = make_quantizer("binary", 1, "weight")(w)
    for c in range(2):
        m = w[c].abs().mean()
        assert torch.allclose(q[c].unique(), torch.stack([-m, m]))


def test_ternary_gives_three_values_from_kept_means():
    w = torch.tensor([0.9, 0.5, 0.02, -0.01, -0.6, -1.0])
    q = make_quantizer("ternary", 2, "weight")
    out = q(w)
    assert torch.allclose(out, torch.tensor([0.7, 0.7, 0, 0, -0.8, -0.8]))
    assert _distinct(out) == 3


def test_lsq_init_and_signedness():
    w = torch.tensor([[0.5, -1.0], [2.0, -0.5]])
    q = make_quantizer("lsq", 4, "weight")
    q(w)
    assert math.isclose(q.step.item(), 2 * 1.0 / math.sqrt(7), rel_tol=1e-6)
    relu_like = make_quantizer("lsq", 2, "activation")
    ratio = relu_like(torch.tensor([[0.0, 1.0, 3.0, 9.0]])) / relu_like.step
    assert not relu_like.signed  # unsigned grid: 0, s, 2s, 3s
    assert torch.allclose(ratio, ratio.round()) and ratio.min() == 0 and ratio.max() <= 3 + 1e-6
    signed = make_quantizer("lsq", 2, "activation")
    signed(torch.tensor([[-1.0, 1.0, 3.0]]))
    assert signed.signed
    fresh = make_quantizer("lsq", 2, "activation")
    fresh.load_state_dict(signed.state_dict())
    probe = torch.tensor([[-5.0, 0.5]])
    assert torch.equal(fresh(probe), signed(probe))
    assert fresh(probe)[0, 0] < 0  # still signed after loading


def test_lsq_per_channel_and_one_bit():
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    q = make_quantizer("lsq", 3, "weight", per_channel=True, channels=3)
    out = q(w)
    assert q.step.shape == (3,) and all(_distinct(out[c]) <= 8 for c in range(3))
    binary = make_quantizer("lsq", 1, "weight")
    out = binary(w)
    s = binary.step
    assert torch.allclose(s, w.abs().mean()) and set(out.unique().tolist()) == {-s.item(), s.item()}


# ---- gradients


def test_lsq_step_gradient_matches_hand_computation():
    q = _initialised("lsq", 2, "weight", step=0.5)  # signed 2 bits: Qn = -2, Qp = 1
    x = torch.tensor([0.3, -1.2, 2.5], requires_grad=True)
    y = q(x)
    assert torch.allclose(y, torch.tensor([0.5, -1.0, 0.5]))
    y.sum().backward()
    # inside: round(v) - v = 1 - 0.6; below: Qn = -2; above: Qp = 1; times g = 1/sqrt(N Qp)
    expected = (0.4 - 2 + 1) / math.sqrt(3 * 1)
    assert math.isclose(q.step.grad.item(), expected, rel_tol=1e-5)
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0, 0.0]))


def test_lsq_activation_gradient_scale_uses_features_per_sample():
    q = _initialised("lsq", 2, "activation", step=1.0)  # unsigned: Qn = 0, Qp = 3
    x = torch.tensor([[0.4, 5.0, -1.0], [1.0, 2.0, 2.0]], requires_grad=True)
    q(x).sum().backward()
    expected = ((0 - 0.4) + 3 + 0 + 0 + 0 + 0) / math.sqrt(3 * 3)
    assert math.isclose(q.step.grad.item(), expected, rel_tol=1e-5)
    assert torch.equal(x.grad, torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))


def test_pact_gradients():
    q = make_quantizer("pact", 2, "activation", alpha=10.0)
    x = torch.tensor([-1.0, 0.5, 3.0, 12.0], requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert q.alpha.grad.item() == 1.0  # one input at or above alpha


def test_binary_gradient_is_clipped_ste():
    w = torch.tensor([[0.5, -2.0, 0.1], [-0.3, 1.0, 3.0]], requires_grad=True)
    make_quantizer("binary", 1, "weight")(w).sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))


def test_ternary_gradients_follow_ttq():
    w = torch.tensor([0.9, 0.5, 0.02, -0.01, -0.6, -1.0], requires_grad=True)
    q = make_quantizer("ternary", 2, "weight")
    upstream = torch.arange(1.0, 7.0)
    (q(w) * upstream).sum().backward()
    g = 1 / math.sqrt(6)  # the sums over each side, scaled by 1/sqrt(weights in the layer)
    assert q.w_pos.grad.item() == pytest.approx((1 + 2) * g) and q.w_neg.grad.item() == pytest.approx(-(5 + 6) * g)
    assert torch.allclose(w.grad, torch.tensor([0.7 * 1, 0.7 * 2, 3, 4, 0.8 * 5, 0.8 * 6]))


@pytest.mark.parametrize("name", ["uniform", "dorefa"])
def test_activation_gradient_is_zero_where_clipped(name):
    q = make_quantizer(name, 3, "activation")
    q(torch.linspace(0, 1, 11))  # range [0, 1] for uniform
    q.eval()
    x = torch.tensor([-0.5, 0.2, 0.7, 1.5], requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_weight_gradient_passes_through_uniform():
    w = torch.randn(4, 5, requires_grad=True)
    make_quantizer("uniform", 3, "weight", per_channel=True)(w).sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))


# ---- exact export, idempotence, properties on random tensors

# (name, role, allowed bits): every method in every role it supports
KINDS = [
    ("uniform", "weight", range(2, 17)), ("uniform", "activation", range(1, 17)),
    ("dorefa", "weight", range(1, 17)), ("dorefa", "activation", range(1, 17)),
    ("pact", "activation", range(1, 17)),
    ("lsq", "weight", range(1, 17)), ("lsq", "activation", range(1, 17)),
    ("binary", "weight", [1]), ("ternary", "weight", [2]),
]


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    bits_pick=st.integers(0, 15),
    seed=st.integers(0, 2**16),
    spread=st.sampled_from([1e-3, 1.0, 50.0]),
    per_channel=st.booleans(),
)
def test_random_tensors_stay_on_the_grid_and_export_exactly(kind, shape, bits_pick, seed, spread, per_channel):
    name, role, allowed = kind
    bits = list(allowed)[bits_pick % len(allowed)]
    options = {"per_channel": per_channel} if name in ("uniform", "lsq") and role == "weight" else {}
    q = make_quantizer(name, bits, role, channels=shape[0], **options)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * spread
    q(x)  # a training step: initialise and observe
    q.eval()
    out = q(x)
    codes = q.export(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, codes.dequantize())
    assert codes.codes.dtype == torch.int64 and codes.codes.min() >= 0 and codes.codes.max() < 2**bits
    groups = out.reshape(shape[0], -1) if per_channel or name == "binary" else out.reshape(1, -1)
    assert all(_distinct(g) <= 2**bits for g in groups)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from([("lsq", "weight"), ("lsq", "activation"), ("pact", "activation"),
                          ("dorefa", "activation"), ("uniform", "activation"), ("ternary", "weight")]),
    bits=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_quantizing_twice_with_fixed_parameters_changes_nothing(kind, bits, seed):
    name, role = kind
    bits = 2 if name == "ternary" else bits
    q = make_quantizer(name, bits, role)
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(seed)) * 2
    q(x)
    q.eval()  # activation ranges frozen; learned scales are fixed anyway
    once = q(x)
    assert torch.equal(q(once), once)


def test_uniform_weight_requantization_is_stable():
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(3))
    q = make_quantizer("uniform", 4, "weight", per_channel=True)
    once = q(w)
    assert torch.allclose(q(once), once, rtol=1e-6, atol=0)


def test_fp16_input_keeps_its_dtype():
    q = make_quantizer("lsq", 4, "activation")
    out = q(torch.randn(2, 8).half())
    assert out.dtype == torch.float16


# ---- bad options: one line that names the fix


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("bits", [0, 33, 2.5, True, "4"])
def test_bits_out_of_range(bits):
    with pytest.raises(KdqError) as err:
        make_quantizer("lsq", bits, "weight")
    assert "bits must be an integer from 1 to 16" in _one_line(err)


def test_bad_quantizers_and_options():
    cases = [
        (lambda: make_quantizer("lsx", 4), "did you mean lsq"),
        (lambda: make_quantizer("pact", 4, "weight"), "for weights use one of"),
        (lambda: make_quantizer("binary", 4, "activation"), "for activations use one of"),
        (lambda: make_quantizer("binary", 2, "weight"), "uses 1 bit"),
        (lambda: make_quantizer("ternary", 3, "weight"), "uses 2 bits"),
        (lambda: make_quantizer("uniform", 1, "weight"), "symmetric=False"),
        (lambda: make_quantizer("lsq", 4, "activation", per_channel=True), "weights only"),
        (lambda: make_quantizer("lsq", 4, "weight", per_channel=True), "channels="),
        (lambda: make_quantizer("lsq", 4, "weights"), "'weight' or 'activation'"),
        (lambda: make_quantizer("pact", 4, "activation", alfa=3.0), "did you mean alpha"),
        (lambda: make_quantizer("pact", 4, "activation", alpha=-1), "alpha must be"),
        (lambda: make_quantizer("ternary", 2, "weight", threshold=1.5), "threshold"),
    ]
    for build, hint in cases:
        with pytest.raises(KdqError) as err:
            build()
        assert hint in _one_line(err)
    assert "choose from binary, dorefa, lsq, pact, ternary, uniform" in str(pytest.raises(KdqError, make_quantizer, "nope", 4).value)
