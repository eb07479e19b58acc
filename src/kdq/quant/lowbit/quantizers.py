"""Low-bit quantizers (1 to 16 bits) for quantization-aware training, each a small nn.Module.

A quantizer's `forward` fake-quantizes a tensor: the output takes at most 2**bits values, and
gradients flow through a straight-through estimator (STE) as the method's paper prescribes.
`export` gives the same values as integer codes in [0, 2**bits) plus what maps them back to
numbers (`QuantCodes`): `scale * (code - zero_point)`, or `levels[code]` for ternary weights.
`forward` computes its output from exactly those codes, so a bit-packed model
(`kdq.quant.lowbit.pack`) reproduces the fake-quantized one bit for bit.

| name    | roles              | bits | method                                                     |
|---------|--------------------|------|------------------------------------------------------------|
| uniform | weight, activation | 1-16 | min-max range: the weight itself, or an EMA of activations |
| dorefa  | weight, activation | 1-16 | DoReFa-Net (Zhou et al. 2016): tanh-normalised weights      |
| pact    | activation         | 1-16 | PACT (Choi et al. 2018): a learned clipping level alpha    |
| lsq     | weight, activation | 1-16 | LSQ (Esser et al. 2020): a learned step size               |
| binary  | weight             | 1    | sign(w) * mean|w| per output channel (XNOR-Net scaling)    |
| ternary | weight             | 2    | TTQ (Zhu et al. 2017): learned positive / negative scales  |

Bit widths mean integer grids throughout: "16 bits" is a uniform grid of 65536 codes, not
float16 or bfloat16. Weights are quantized per output channel along axis 0 where a
quantizer offers `per_channel`. Arithmetic runs in float32 whatever the input dtype (fp16
under autocast), so 16-bit grids stay exact.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdq.errors import KdqError, suggest
from kdq.registry import Registry

ROLES = ("weight", "activation")
MAX_BITS = 16
# Floor for scales computed from data: an all-zero tensor must not divide by zero.
EPS = 1e-12

QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer")


def check_bits(bits: Any, what: str = "bits") -> int:
    """`bits` as an int in 1..16, or a one-line KdqError."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= MAX_BITS:
        raise KdqError(f"{what} must be an integer from 1 to {MAX_BITS}, got {bits!r}")
    return int(bits)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise KdqError(message)


# ---- the straight-through parts every quantizer is built from


def grad_only(x: torch.Tensor) -> torch.Tensor:
    """Exactly zero in the forward pass, with the gradient of `x` in the backward pass."""
    return x - x.detach()


def ste(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass, the gradient of `surrogate` in the backward pass.

    Unlike the common `x + (q - x).detach()`, which can be one rounding off `q`, this returns
    `value` bit for bit, so the fake-quantized output equals its exported codes exactly.
    """
    return value.detach() + grad_only(surrogate)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x), with the identity as its gradient (Bengio et al. 2013)."""
    return ste(torch.round(x), x)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """`scale * (codes - zero_point)`: the one formula both `forward` and `QuantCodes` use."""
    return (codes - zero_point) * scale


def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along axis 0 of an `ndim`-dimensional tensor."""
    return t.reshape(-1, *([1] * (ndim - 1)))


def per_channel_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as (channels, everything else): the rows per-channel statistics reduce over."""
    return x.reshape(x.shape[0], -1) if x.ndim > 0 else x.reshape(1, 1)


@dataclass
class QuantCodes:
    """A quantized tensor as integer codes plus what turns them back into values.

    Affine: `value = scale * (code - zero_point)`, with `scale` and `zero_point` shaped to
    broadcast against the codes (0-d per tensor, (C, 1, ...) per channel). Lookup:
    `value = levels[code]` with a 1-D table `levels` (ternary weights: -Wn, 0, Wp).
    """

    codes: torch.Tensor  # int64, the tensor's shape, every value in [0, 2**bits)
    bits: int
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    levels: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return "lookup" if self.levels is not None else "affine"

    def dequantize(self) -> torch.Tensor:
        if self.levels is not None:
            return self.levels[self.codes]
        assert self.scale is not None and self.zero_point is not None
        return dequantize(self.codes.to(self.scale.dtype), self.scale, self.zero_point)

    def to(self, device: torch.device | str) -> QuantCodes:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return QuantCodes(move(self.codes), self.bits, move(self.scale), move(self.zero_point), move(self.levels))


# ---- the base class: bits, role, lazy data-dependent initialisation, forward/export


class Quantizer(nn.Module):
    """Fake-quantizes a weight or an activation to `bits` bits.

    Subclasses implement `_encode(x) -> (codes, scale, zero_point)` with float codes that
    carry the method's STE gradient; quantizers whose state depends on data (step sizes,
    ranges) set `stateful` and fill it in `_init_state` from the first tensor they see.
    """

    name = ""
    roles: tuple[str, ...] = ROLES
    bit_choices: tuple[int, ...] | None = None  # None: any width from 1 to 16

    def __init__(self, bits: int, role: str, *, stateful: bool = False) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        _check(role in ROLES, f"quantizer role must be 'weight' or 'activation', got {role!r}")
        if role not in self.roles:
            others = [n for n in QUANTIZERS.names() if role in QUANTIZERS.get(n).roles]
            raise KdqError(f"{self.name} quantizes {' and '.join(self.roles)}s only; for {role}s use one of {', '.join(others)}")
        if self.bit_choices is not None and self.bits not in self.bit_choices:
            raise KdqError(
                f"{self.name} quantization uses {self.bit_choices[0]} bit{'s' * (self.bit_choices[0] > 1)}, "
                f"got bits={self.bits}; use lsq, dorefa or uniform for other widths"
            )
        self.role = role
        self.stateful = stateful
        if stateful:
            self.register_buffer("initialized", torch.tensor(False))
        # Mirrors `initialized` on the host, so a warm forward never waits on the GPU to read it.
        self._ready = False

    @property
    def num_codes(self) -> int:
        """How many codes the grid has: 2**bits."""
        return 1 << self.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        self._prepare(xf, observe=self.training)
        return dequantize(*self._encode(xf)).to(x.dtype)

    @torch.no_grad()
    def export(self, x: torch.Tensor) -> QuantCodes:
        """The codes (and scale, zero point) that `forward(x)` returns the values of."""
        xf = x.detach().float()
        self._prepare(xf, observe=False)
        codes, scale, zero_point = self._encode(xf)
        return QuantCodes(codes.to(torch.int64), self.bits, scale, zero_point)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _init_state(self, x: torch.Tensor) -> None:
        """Set data-dependent state from the first tensor seen (stateful quantizers only)."""

    def _observe(self, x: torch.Tensor) -> None:
        """Update running statistics from a training batch (stateful quantizers only)."""

    def _sync_state(self) -> None:
        """Refresh host-side copies of buffers after initialisation or loading."""

    def _prepare(self, x: torch.Tensor, observe: bool) -> None:
        if not self.stateful:
            return
        if not self._ready:
            if not bool(self.initialized):  # a host sync, on the first call only
                with torch.no_grad():
                    self._init_state(x.detach())
                self.initialized.fill_(True)
                observe = False  # the first batch has just set the state
            self._sync_state()
            self._ready = True
        if observe:
            with torch.no_grad():
                self._observe(x.detach())

    @contextmanager
    def at_bits(self, bits: int) -> Iterator[Quantizer]:
        """Quantize to `bits` over the same range inside the block, then restore.

        SPEQ's teacher passes use it to see the layer at another precision with the same
        learned clip; nothing learned is changed.
        """
        old = self.bits
        self.bits = check_bits(bits)
        try:
            yield self
        finally:
            self.bits = old

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Loaded buffers may say "initialised" or not: read them again on the next forward.
        self._ready = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, role={self.role}"


def _register(cls: type[Quantizer]) -> type[Quantizer]:
    QUANTIZERS.register(cls.name)(cls)
    return cls


def make_quantizer(name: str, bits: int, role: str = "weight", *, channels: int | None = None, **options: Any) -> Quantizer:
    """Build the registered quantizer `name` for a weight or an activation.

    `options` are the quantizer's keyword options (e.g. `per_channel`, `symmetric`, `alpha`);
    an unknown one is a KdqError. `channels` is the weight's output-channel count; it is passed
    on only to quantizers that keep per-channel learned state (per-channel lsq).
    """
    if not isinstance(name, str) or name not in QUANTIZERS:
        raise KdqError(f"unknown quantizer {name!r}{suggest(str(name), QUANTIZERS.names())}; choose from {', '.join(QUANTIZERS.names())}")
    cls = QUANTIZERS.get(name)
    params = inspect.signature(cls.__init__).parameters
    # `channels` comes from the layer and `stateful` from the class, never from the user
    allowed = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p not in ("channels", "stateful")]
    for key in options:
        if key not in allowed:
            raise KdqError(
                f"quantizer {name!r} does not take option {key!r}{suggest(key, allowed)}; "
                f"it takes: {', '.join(allowed) or 'no options'}"
            )
    if channels is not None and "channels" in params:
        options["channels"] = channels
    return cls(bits, role, **options)


# ---- the methods


@_register
class UniformQuantizer(Quantizer):
    """Min-max uniform quantization: the grid spans the observed range of the tensor.

    Weights use their own min/max on every call (per output channel with `per_channel`);
    activations use an exponential moving average of batch min/max while training and the
    frozen averages in eval. Symmetric grids (the weight default) are zero-centred with
    2**bits - 1 levels, so they need 2 bits or more; asymmetric grids (the activation
    default) use all 2**bits levels over a range widened to include 0, so 0 stays exact.
    Gradients pass straight through inside the range and are zero where activations clip.
    """

    name = "uniform"

    def __init__(
        self,
        bits: int,
        role: str,
        *,
        symmetric: bool | None = None,
        per_channel: bool = False,
        momentum: float = 0.1,
    ) -> None:
        super().__init__(bits, role, stateful=role == "activation")
        self.symmetric = role == "weight" if symmetric is None else symmetric
        _check(isinstance(self.symmetric, bool), f"symmetric must be true or false, got {symmetric!r}")
        _check(isinstance(per_channel, bool), f"per_channel must be true or false, got {per_channel!r}")
        _check(not (per_channel and role == "activation"), "per_channel quantization is for weights only; use per_channel=False for activations")
        _check(
            not (self.symmetric and self.bits < 2),
            "symmetric uniform quantization needs 2 or more bits; use symmetric=False, or the binary or dorefa quantizer for 1 bit",
        )
        _check(isinstance(momentum, (int, float)) and 0 < momentum <= 1, f"momentum must be in (0, 1], got {momentum!r}")
        self.per_channel = per_channel
        self.momentum = float(momentum)
        if role == "activation":
            self.register_buffer("running_min", torch.zeros(()))
            self.register_buffer("running_max", torch.zeros(()))

    def _init_state(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        self.running_min.copy_(lo)
        self.running_max.copy_(hi)

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        self.running_min.lerp_(lo, self.momentum)
        self.running_max.lerp_(hi, self.momentum)

    def _range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.role == "activation":
            return self.running_min, self.running_max
        if self.per_channel:
            lo, hi = torch.aminmax(per_channel_rows(x.detach()), dim=1)
            return channel_view(lo, x.ndim), channel_view(hi, x.ndim)
        return torch.aminmax(x.detach())

    def _encode(self, x):
        lo, hi = self._range(x)
        top = self.num_codes - 1
        if self.symmetric:
            half = self.num_codes // 2
            scale = (torch.maximum(-lo, hi) / (half - 1)).clamp_min(EPS)
            zero_point = torch.full_like(scale, half)
            low = 1  # code 0 would be -half: leaving it out keeps the grid symmetric
        else:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            scale = ((hi - lo) / top).clamp_min(EPS)
            zero_point = torch.round(-lo / scale).clamp(0, top)
            low = 0
        codes = (round_ste(x / scale) + zero_point).clamp(low, top)
        return codes, scale, zero_point

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, symmetric={self.symmetric}, per_channel={self.per_channel}"


@_register
class DoReFaQuantizer(Quantizer):
    """DoReFa-Net quantization (Zhou et al. 2016, "DoReFa-Net", eqs. 9 and 11).

    Weights, k >= 2: `w_q = 2 * quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`, a grid of
    2**k levels in [-1, 1]; k = 1: `sign(w) * E|w|` with E|w| a constant over the layer.
    Activations: `quantize_k(clip(x, 0, 1))`. `quantize_k(a) = round((2**k - 1) a) / (2**k - 1)`
    with the identity as the gradient of `round`, so gradients reach w through tanh and are
    zero where activations clip.
    """

    name = "dorefa"

    def _encode(self, x):
        top = self.num_codes - 1
        if self.role == "activation":
            return round_ste(x.clamp(0, 1) * top), x.new_tensor(1 / top), x.new_tensor(0.0)
        if self.bits == 1:
            mean_abs = x.detach().abs().mean().clamp_min(EPS)
            # codes 0/1 around zero point 1/2 with scale 2E give -E and +E exactly
            codes = ste((x >= 0).to(x.dtype), x / (2 * mean_abs) + 0.5)
            return codes, 2 * mean_abs, x.new_tensor(0.5)
        t = torch.tanh(x)
        unit = t / (2 * t.abs().max().clamp_min(EPS)) + 0.5  # in [0, 1]
        # 2 * (n / top) - 1 written as (n - top/2) * (2/top): the same grid in affine form
        return round_ste(unit * top), x.new_tensor(2 / top), x.new_tensor(top / 2)


@_register
class PACTQuantizer(Quantizer):
    """PACT (Choi et al. 2018): clip activations to [0, alpha] with alpha learned, then k bits.

    `y = clip(x, 0, alpha)`, `y_q = round(y * (2**k - 1) / alpha) * alpha / (2**k - 1)`. With
    the STE on the rounding, d y_q / d x = 1 for 0 <= x < alpha and 0 elsewhere, and
    d y_q / d alpha = 1 where x >= alpha and 0 elsewhere (the paper's eq. 3). The paper also
    puts an L2 penalty on alpha; kdq's optimizer leaves 0-d parameters out of weight decay, so
    add one to the loss if you want it.
    """

    name = "pact"
    roles = ("activation",)

    def __init__(self, bits: int, role: str, *, alpha: float = 10.0) -> None:
        super().__init__(bits, role)
        _check(
            isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0,
            f"pact alpha must be a number > 0, got {alpha!r}",
        )
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.clamp_min(EPS)  # a step of SGD must not turn the range inside out
        return torch.where(x >= alpha, alpha, F.relu(x))

    def _encode(self, x):
        scale = (self.alpha.clamp_min(EPS) / (self.num_codes - 1)).detach()
        return torch.round(self._clip(x).detach() / scale), scale, x.new_tensor(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return ste(dequantize(*self._encode(xf)), self._clip(xf)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha.item():.4g}"


@_register
class LSQQuantizer(Quantizer):
    """Learned step size quantization (Esser et al. 2020, "Learned Step Size Quantization").

    `y = round(clip(x / s, Qn, Qp)) * s` with s learned. Gradients: d y / d x = 1 inside the
    range and 0 outside; d y / d s = round(x/s) - x/s inside, Qn or Qp outside; the gradient
    of s is scaled by g = 1 / sqrt(N * Qp), N the weights per step size or the features per
    sample of an activation. s starts at 2 mean|x| / sqrt(Qp) on the first forward.

    Weights are signed (Qn = -2**(b-1), Qp = 2**(b-1) - 1). Activations are unsigned
    (Qn = 0, Qp = 2**b - 1) when the first batch seen is non-negative, signed otherwise; the
    decision lives in the `signed` buffer, so it survives saving and loading. At 1 bit the
    signed grid would be {-s, 0}, so signed 1-bit LSQ uses {-s, +s} instead (codes 0/1 around
    zero point 1/2, the binary grid), starting at s = mean|x| (the XNOR-Net optimum), with
    round replaced by sign and g = 1 / sqrt(N).
    """

    name = "lsq"

    def __init__(self, bits: int, role: str, *, per_channel: bool = False, channels: int | None = None) -> None:
        super().__init__(bits, role, stateful=True)
        _check(isinstance(per_channel, bool), f"per_channel must be true or false, got {per_channel!r}")
        _check(not (per_channel and role == "activation"), "per_channel quantization is for weights only; use per_channel=False for activations")
        _check(
            not per_channel or (isinstance(channels, int) and channels >= 1),
            "per-channel lsq needs channels= (the weight's output channels); quantize_lowbit passes it for you",
        )
        self.per_channel = per_channel
        self.step = nn.Parameter(torch.ones(channels if per_channel else ()))
        self.register_buffer("signed", torch.tensor(role == "weight"))
        self._signed = role == "weight"
        self._step_factor = 1.0  # != 1 only inside at_bits

    @contextmanager
    def at_bits(self, bits: int) -> Iterator[Quantizer]:
        # the same clip range at another width: the step shrinks as the grid gains levels
        top = self._bounds()[1]
        with super().at_bits(bits):
            self._step_factor = max(top, 1) / max(self._bounds()[1], 1)
            try:
                yield self
            finally:
                self._step_factor = 1.0

    def _sync_state(self) -> None:
        self._signed = bool(self.signed)

    def _binary(self) -> bool:
        return self._signed and self.bits == 1

    def _bounds(self) -> tuple[int, int]:
        if self._signed:
            return -(self.num_codes // 2), self.num_codes // 2 - 1
        return 0, self.num_codes - 1

    def _init_state(self, x: torch.Tensor) -> None:
        if self.per_channel and x.shape[0] != self.step.numel():
            raise KdqError(f"per-channel lsq was built for {self.step.numel()} channels but got a weight with {x.shape[0]}")
        if self.role == "activation":
            self.signed.fill_(bool(x.min() < 0))  # a host sync, once
            self._sync_state()
        mean_abs = per_channel_rows(x).abs().mean(1) if self.per_channel else x.abs().mean()
        init = mean_abs if self._binary() else 2 * mean_abs / math.sqrt(self._bounds()[1])
        self.step.copy_(init.clamp_min(EPS).reshape(self.step.shape))

    def _encode(self, x):
        qn, qp = self._bounds()
        if self.role == "activation":
            n = x[0].numel() if x.ndim > 1 else x.numel()  # features per sample
        else:
            n = x.numel() // self.step.numel()  # weights per step size
        g = 1.0 / math.sqrt(n * (1 if self._binary() else qp))
        step = ste(self.step, self.step * g)  # value s, gradient scaled by g
        if self._step_factor != 1.0:
            step = step * self._step_factor
        s = channel_view(step, x.ndim) if self.per_channel else step
        v = x / s
        if self._binary():
            v = v.clamp(-1, 1)
            sign = ste(torch.where(v >= 0, 1.0, -1.0), v)
            return (sign + 1) / 2, 2 * s, x.new_tensor(0.5)
        return round_ste(v.clamp(qn, qp)) - qn, s, x.new_tensor(float(-qn))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_channel={self.per_channel}"


@_register
class BinaryQuantizer(Quantizer):
    """Binary weights: `sign(w) * mean|w|`, one scale per output channel (XNOR-Net, Rastegari
    et al. 2016). The gradient is BinaryNet's clipped STE (Hubara et al. 2016): it passes where
    |w| <= 1 and is zero elsewhere; the scale is treated as a constant. sign(0) counts as +1.
    """

    name = "binary"
    roles = ("weight",)
    bit_choices = (1,)

    def _encode(self, x):
        mean_abs = channel_view(per_channel_rows(x.detach()).abs().mean(1), x.ndim).clamp_min(EPS)
        if x.ndim == 0:
            mean_abs = mean_abs.reshape(())
        # codes 0/1 around zero point 1/2 with scale 2 mean|w| give -mean|w| and +mean|w| exactly
        return (x >= 0).to(x.dtype), 2 * mean_abs, x.new_tensor(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return ste(dequantize(*self._encode(xf)), xf.clamp(-1, 1)).to(x.dtype)


@_register
class TernaryQuantizer(Quantizer):
    """Trained ternary quantization (Zhu et al. 2017, "Trained Ternary Quantization").

    `w_t = Wp` where w > t max|w|, `-Wn` where w < -t max|w|, 0 between, with Wp and Wn learned
    (initialised on the first forward to the mean magnitude of the weights kept on each side).
    Gradients (the paper's eqs. 7 and 8): dL/dWp sums dL/dw_t over the positive weights,
    dL/dWn minus that over the negative ones; the latent weights get dL/dw_t scaled by Wp,
    1 or Wn in the positive, zero and negative regions. kdq scales the two sums by
    1/sqrt(N), N the layer's weights, as LSQ scales its step's gradient: with the raw sums,
    SGD at lr 0.01 drove Wp and Wn negative within one epoch of ResNet-20 on Fashion-MNIST
    (accuracy 0.17). Exported as a 3-entry lookup table.
    """

    name = "ternary"
    roles = ("weight",)
    bit_choices = (2,)

    def __init__(self, bits: int, role: str, *, threshold: float = 0.05) -> None:
        super().__init__(bits, role, stateful=True)
        _check(
            isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 < threshold < 1,
            f"ternary threshold must be a fraction of max|w| in (0, 1), got {threshold!r}",
        )
        self.threshold = float(threshold)
        self.w_pos = nn.Parameter(torch.ones(()))
        self.w_neg = nn.Parameter(torch.ones(()))

    def _masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = self.threshold * x.detach().abs().max()
        return x > delta, x < -delta

    def _init_state(self, x: torch.Tensor) -> None:
        pos, neg = self._masks(x)
        fallback = x.abs().max().clamp_min(EPS)  # no weight kept on a side: start at the largest
        self.w_pos.copy_(torch.where(pos.any(), (x * pos).sum() / pos.sum().clamp_min(1), fallback))
        self.w_neg.copy_(torch.where(neg.any(), -(x * neg).sum() / neg.sum().clamp_min(1), fallback))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        self._prepare(xf, observe=False)
        pos, neg = self._masks(xf)
        p, n = pos.to(xf.dtype), neg.to(xf.dtype)
        g = 1.0 / math.sqrt(xf.numel())
        value = ste(self.w_pos, self.w_pos * g) * p - ste(self.w_neg, self.w_neg * g) * n  # carries Wp's and Wn's gradients
        factor = (self.w_pos.detach() * p + self.w_neg.detach() * n + (1 - p - n)).detach()
        return (value + grad_only(factor * xf)).to(x.dtype)

    @torch.no_grad()
    def export(self, x: torch.Tensor) -> QuantCodes:
        xf = x.detach().float()
        self._prepare(xf, observe=False)
        pos, neg = self._masks(xf)
        levels = torch.stack([-self.w_neg, torch.zeros_like(self.w_neg), self.w_pos]).detach()
        return QuantCodes(1 + pos.to(torch.int64) - neg.to(torch.int64), self.bits, levels=levels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"
