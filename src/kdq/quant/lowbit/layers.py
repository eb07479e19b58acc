"""Drop-in low-bit layers and `quantize_lowbit`, the one entry point that puts them in a model.

`quantize_lowbit(model, LowBitConfig.parse("w4a4"))` returns a copy of `model` whose Conv2d
and Linear layers fake-quantize their weights and inputs; train it with `kdq.engine.fit`
like any model. What was done is recorded as JSON data in `model.kdq_lowbit`, per layer, so
`rebuild_lowbit` (and `load_packed`) can redo it on a fresh float model without the filter.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdq.errors import KdqError, suggest
from kdq.quant.lowbit.quantizers import (
    QUANTIZERS,
    QuantCodes,
    Quantizer,
    check_bits,
    make_quantizer,
)

RECORD_VERSION = 1
# Quantizers that suit any bit width and signed inputs: the first layer sees normalised images
# (negative values that dorefa and pact would clip to 0) and binary/ternary fix the width.
# The first and last layers keep these and fall back to `uniform` otherwise.
_EDGE_QUANTIZERS = ("lsq", "uniform")


class _QuantLayer(nn.Module):
    """What QuantConv2d and QuantLinear share: a float weight, its quantizer, an input quantizer.

    Either quantizer may be None (float). `freeze_weight` replaces the float weight by its
    quantized values and stops training it: that is how `load_packed` rebuilds a layer whose
    latent float weight was never saved.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_quantizer: Quantizer | None,
        act_quantizer: Quantizer | None,
    ) -> None:
        super().__init__()
        for q, role in ((weight_quantizer, "weight"), (act_quantizer, "activation")):
            if q is not None and (not isinstance(q, Quantizer) or q.role != role):
                raise KdqError(f"the {role} quantizer must be a kdq Quantizer made with role={role!r}, got {q!r}")
        self.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        # The codes behind a frozen weight; None while the weight trains.
        self.weight_codes: QuantCodes | None = None
        self.to(weight.device)  # quantizer state next to the weight it serves

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_codes is not None or self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self.weight)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_quantizer is None else self.act_quantizer(x)

    def export_weight(self) -> QuantCodes:
        """The weight as integer codes (CPU tensors), ready for `pack_codes`."""
        if self.weight_codes is not None:
            return self.weight_codes
        if self.weight_quantizer is None:
            raise KdqError("this layer keeps a float weight (no weight quantizer), so it has no codes to export")
        return self.weight_quantizer.export(self.weight).to("cpu")

    @torch.no_grad()
    def freeze_weight(self, codes: QuantCodes | None = None) -> None:
        """Set the weight to its quantized values (from `codes`, or the quantizer) and stop training it.

        `unfreeze_weight` resumes quantization-aware training from those values.
        """
        codes = (self.export_weight() if codes is None else codes).to("cpu")
        if tuple(codes.codes.shape) != tuple(self.weight.shape):
            raise KdqError(f"codes of shape {tuple(codes.codes.shape)} cannot replace a weight of shape {tuple(self.weight.shape)}")
        self.weight.copy_(codes.dequantize().to(self.weight))
        self.weight.requires_grad_(False)
        self.weight_codes = codes

    def unfreeze_weight(self) -> None:
        self.weight_codes = None
        self.weight.requires_grad_(True)

    def extra_repr(self) -> str:
        w = self.weight_quantizer.bits if self.weight_quantizer is not None else "float"
        a = self.act_quantizer.bits if self.act_quantizer is not None else "float"
        return f"weight_bits={w}, act_bits={a}, frozen={self.weight_codes is not None}"


class QuantConv2d(_QuantLayer):
    """An nn.Conv2d that convolves its quantized input with its quantized weight."""

    def __init__(self, conv: nn.Conv2d, weight_quantizer: Quantizer | None = None, act_quantizer: Quantizer | None = None) -> None:
        if conv.padding_mode != "zeros":
            raise KdqError(f"QuantConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        super().__init__(conv.weight, conv.bias, weight_quantizer, act_quantizer)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.quantized_input(x), self.quantized_weight(), self.bias,
            self.stride, self.padding, self.dilation, self.groups,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, {super().extra_repr()}"
        )


class QuantLinear(_QuantLayer):
    """An nn.Linear applied to its quantized input with its quantized weight."""

    def __init__(self, linear: nn.Linear, weight_quantizer: Quantizer | None = None, act_quantizer: Quantizer | None = None) -> None:
        super().__init__(linear.weight, linear.bias, weight_quantizer, act_quantizer)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {super().extra_repr()}"


QUANT_LAYERS = (QuantConv2d, QuantLinear)
# Exact types: a subclass may not call its own forward (MultiheadAttention's out_proj does not).
_FLOAT_LAYERS: dict[type[nn.Module], type[_QuantLayer]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


# ---- the config


_SPEC = re.compile(r"w(\d+)(?:a(\d+))?", re.IGNORECASE)


@dataclass(frozen=True)
class LowBitConfig:
    """A low-bit QAT scheme. Invalid values fail here, with one line, before any work.

    `act_bits=None` keeps activations float. `per_channel` applies to the quantizers that offer
    it (lsq, uniform); dorefa and ternary are per tensor and binary per channel by definition.
    With `first_last_bits` set, the model's first and last Conv2d/Linear layers use that many
    bits for weights and activations, with lsq or uniform (see `_EDGE_QUANTIZERS`); None
    quantizes them like every other layer.
    """

    weight_bits: int
    act_bits: int | None
    weight_quantizer: str = "lsq"
    act_quantizer: str = "lsq"
    per_channel: bool = True
    first_last_bits: int | None = 8

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None and not _is_bits(self.act_bits):
            raise KdqError(f"act_bits must be an integer from 1 to 16, or None for float activations, got {self.act_bits!r}")
        if self.first_last_bits is not None and not _is_bits(self.first_last_bits):
            raise KdqError(f"first_last_bits must be an integer from 1 to 16, or None to treat them like the rest, got {self.first_last_bits!r}")
        if not isinstance(self.per_channel, bool):
            raise KdqError(f"per_channel must be true or false, got {self.per_channel!r}")
        # Build each quantizer once, so a bad pairing (pact weights, 3-bit ternary) fails now.
        for edge in (False, True):
            for role, spec in zip(("weight", "activation"), self.layer_plan(edge).values()):
                if spec is not None:
                    make_quantizer(spec["name"], spec["bits"], role, channels=1, **spec["options"])

    @classmethod
    def parse(cls, text: str, quantizer: str = "lsq", **options: Any) -> LowBitConfig:
        """A config from "w4a4", "w2a32" or "w2" (a32 or no a: float activations), "w1a2".

        `quantizer` names both quantizers; `options` set any other field (e.g.
        `act_quantizer="pact"`, `first_last_bits=None`) and override `quantizer`.
        """
        match = _SPEC.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise KdqError(f"cannot read low-bit scheme {text!r}; write w<bits>a<bits> such as w4a4, w1a2, w2a32 or w2 (a32 or no a: float activations)")
        act = None if match[2] is None or int(match[2]) == 32 else int(match[2])
        values = {"weight_quantizer": quantizer, "act_quantizer": quantizer, **options}
        return cls.from_dict({"weight_bits": int(match[1]), "act_bits": act, **values})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LowBitConfig:
        """Build from plain data (JSON, YAML), rejecting unknown keys by name."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                raise KdqError(f"unknown low-bit option {key!r}{suggest(key, known)}; options: {', '.join(known)}")
        if "act_bits" not in values or "weight_bits" not in values:
            raise KdqError("a low-bit config needs weight_bits and act_bits (null for float activations)")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def layer_plan(self, edge: bool = False) -> dict[str, dict[str, Any] | None]:
        """The quantizers of one layer as JSON data: {"weight": spec, "act": spec or None}.

        `edge` marks the model's first or last layer. A spec is {"name", "bits", "options"}.
        """
        w_name, a_name, w_bits, a_bits = self.weight_quantizer, self.act_quantizer, self.weight_bits, self.act_bits
        if edge and self.first_last_bits is not None:
            w_name, a_name = _edge_quantizer(w_name), _edge_quantizer(a_name)
            w_bits = self.first_last_bits
            a_bits = None if a_bits is None else self.first_last_bits
        weight = {"name": w_name, "bits": w_bits, "options": _per_channel_option(w_name, self.per_channel)}
        act = None if a_bits is None else {"name": a_name, "bits": a_bits, "options": {}}
        return {"weight": weight, "act": act}


def _is_bits(value: Any) -> bool:
    try:
        check_bits(value)
    except KdqError:
        return False
    return True


def _edge_quantizer(name: str) -> str:
    return name if name in _EDGE_QUANTIZERS else "uniform"


def _per_channel_option(name: str, per_channel: bool) -> dict[str, Any]:
    if not isinstance(name, str) or name not in QUANTIZERS:
        return {}  # make_quantizer names the bad quantizer
    takes = "per_channel" in inspect.signature(QUANTIZERS.get(name).__init__).parameters
    return {"per_channel": per_channel} if takes else {}


# ---- the entry point


def quantize_lowbit(
    model: nn.Module,
    config: LowBitConfig | str,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """A copy of `model` whose Conv2d/Linear layers (those `filter_fn(name, module)` accepts,
    all by default) are QuantConv2d/QuantLinear layers following `config`.

    `config` may be a scheme string such as "w4a4" (lsq). The first and the last Conv2d/Linear
    layer in module order (the input layer and the classifier in the zoo) get
    `config.first_last_bits`. The original model is not modified; the result records what was
    done in `kdq_lowbit` (JSON data) and keeps the original's `kdq_spec`.
    """
    if isinstance(config, str):
        config = LowBitConfig.parse(config)
    if not isinstance(config, LowBitConfig):
        raise KdqError(f"config must be a LowBitConfig or a scheme string such as 'w4a4', got {type(config).__name__}")
    layers = [(name, m) for name, m in model.named_modules() if type(m) in _FLOAT_LAYERS]
    if not layers:
        raise KdqError("the model has no nn.Conv2d or nn.Linear layer to quantize")
    chosen = [name for name, m in layers if filter_fn is None or filter_fn(name, m)]
    if not chosen:
        names = ", ".join(name for name, _ in layers[:4])
        raise KdqError(
            f"filter_fn accepted none of the model's {len(layers)} Conv2d/Linear layers ({names}, ...); "
            "it is called as filter_fn(name, module) and must return True for each layer to quantize"
        )
    edges = {layers[0][0], layers[-1][0]}
    plan = {name: config.layer_plan(edge=name in edges) for name in chosen}
    return rebuild_lowbit(model, {"version": RECORD_VERSION, "config": config.to_dict(), "layers": plan})


def rebuild_lowbit(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Apply a `kdq_lowbit` record (from `quantize_lowbit` or a saved manifest) to a copy of `model`."""
    try:
        version, layers = record["version"], record["layers"]
        specs = {name: (plan["weight"], plan["act"]) for name, plan in layers.items()}
    except (KeyError, TypeError, AttributeError):
        raise KdqError("malformed low-bit record: expected {'version', 'config', 'layers': {name: {'weight', 'act'}}}") from None
    if version != RECORD_VERSION:
        raise KdqError(f"low-bit record version {version!r} is not supported (this kdq reads version {RECORD_VERSION})")
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name, (weight_spec, act_spec) in specs.items():
        layer = modules.get(name)
        if not name or type(layer) not in _FLOAT_LAYERS:
            raise KdqError(f"the low-bit record names layer {name!r}, which is not a Conv2d/Linear of this model")
        quant = _FLOAT_LAYERS[type(layer)](
            layer,
            _build(weight_spec, "weight", channels=layer.weight.shape[0]),
            _build(act_spec, "activation"),
        )
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, quant)
    # Stored as its JSON round trip: exactly what a manifest gives back.
    model.kdq_lowbit = json.loads(json.dumps(record))
    return model


def _build(spec: dict[str, Any] | None, role: str, channels: int | None = None) -> Quantizer | None:
    if spec is None:
        return None
    try:
        name, bits, options = spec["name"], spec["bits"], dict(spec["options"])
    except (KeyError, TypeError, ValueError):
        raise KdqError(f"malformed quantizer spec {spec!r}: expected {{'name', 'bits', 'options'}}") from None
    return make_quantizer(name, bits, role, channels=channels, **options)


def lowbit_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """The model's low-bit layers by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}
