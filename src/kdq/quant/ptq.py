"""Post-training int8 quantization: static (FX graph mode, calibrated) and dynamic (Linear, LSTM, GRU)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig_mapping, observer as obs
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

from kdq.errors import KdqError, suggest

BACKENDS = ("x86", "fbgemm", "qnnpack")
OBSERVERS = ("minmax", "moving_average", "histogram")

_ACTIVATION_OBSERVERS = {
    "minmax": obs.MinMaxObserver,
    "moving_average": obs.MovingAverageMinMaxObserver,
    "histogram": obs.HistogramObserver,
}


def check_backend(backend: str) -> str:
    """Select `backend` as torch's quantized engine, or KdqError naming the choices."""
    if backend not in BACKENDS:
        raise KdqError(f"unknown quantization backend {backend!r}{suggest(backend, BACKENDS)}; choose from {', '.join(BACKENDS)}")
    if backend not in torch.backends.quantized.supported_engines:
        have = ", ".join(e for e in BACKENDS if e in torch.backends.quantized.supported_engines)
        raise KdqError(f"this torch build has no {backend!r} quantized engine; it has: {have or 'none'}")
    # The engine picks the int8 kernels used at convert and run time; it must match the qconfig.
    torch.backends.quantized.engine = backend
    return backend


def build_qconfig_mapping(
    backend: str, observer: str = "histogram", per_channel: bool = True, skip: Iterable[str] = ()
) -> QConfigMapping:
    """The static-quantization recipe: activation observer, weight granularity, float-kept modules."""
    if observer not in OBSERVERS:
        raise KdqError(f"unknown observer {observer!r}{suggest(observer, OBSERVERS)}; choose from {', '.join(OBSERVERS)}")
    # fbgemm/x86 int8 kernels can overflow 16-bit accumulators on full-range activations
    # (vpmaddubsw); torch's own defaults reduce the range to 7 bits there, and so do we.
    reduce_range = backend in ("x86", "fbgemm")
    activation = _ACTIVATION_OBSERVERS[observer].with_args(dtype=torch.quint8, reduce_range=reduce_range)
    if per_channel:
        weight = obs.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        weight = obs.MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    # Start from torch's backend defaults: they carry the fixed-qparams settings for sigmoid/tanh etc.
    mapping = get_default_qconfig_mapping(backend).set_global(QConfig(activation=activation, weight=weight))
    for name in skip:
        mapping.set_module_name(name, None)
    return mapping


def check_skip(model: nn.Module, skip: Iterable[str]) -> list[str]:
    """`skip` as a list, each a real submodule name; fail now rather than silently quantize it."""
    names = [n for n, _ in model.named_modules() if n]
    out = list(skip)
    for name in out:
        if name not in names:
            raise KdqError(
                f"cannot skip {name!r}: no such layer{suggest(name, names)}; "
                f"--skip takes module names such as {', '.join(names[:3])}"
            )
    return out


def prepare_custom_config(skip: list[str]) -> PrepareCustomConfig:
    # A skipped module is also left untraced, so `--skip LAYER` rescues data-dependent Python code.
    return PrepareCustomConfig().set_non_traceable_module_names(skip)


def fx_call(fn, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Run an FX prepare step; turn a tracing failure into a KdqError naming the module to skip."""
    with warnings.catch_warnings():
        # torch.ao FX quantization is deprecated in favour of PT2E; the warnings say nothing actionable here
        warnings.simplefilter("ignore")
        try:
            return fn(*args, **kwargs)
        except KdqError:
            raise
        except Exception as err:  # noqa: BLE001  tracing raises many types (TraceError, TypeError, ...)
            where = _untraceable_module(model)
            what = f"layer {where!r}" if where else "the model's forward"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise KdqError(
                f"cannot trace {what} for static quantization ({type(err).__name__}: {first}); "
                f"keep it float with --skip {where or 'LAYER'}, or use dynamic quantization"
            ) from None


def _untraceable_module(model: nn.Module) -> str | None:
    """The deepest user-defined submodule that torch.fx cannot trace on its own, if any."""
    failing = []
    for name, mod in model.named_modules():
        if not name or type(mod).__module__.startswith("torch."):
            continue  # torch's own layers are leaves in FX tracing and never the culprit
        try:
            torch.fx.symbolic_trace(mod)
        except Exception:  # noqa: BLE001
            failing.append(name)
    return max(failing, key=lambda n: n.count("."), default=None)


def quantize_static(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    backend: str = "x86",
    observer: str = "histogram",
    per_channel: bool = True,
    batch_size: int = 256,
    skip: Iterable[str] = (),
) -> nn.Module:
    """An int8 copy of `model`: FX-fused (conv-bn-relu, linear-relu), calibrated on `calibration`.

    `calibration` is an (N, ...) tensor of typical inputs; modules named in `skip` stay float.
    The original model is not modified. The result runs on the CPU with `backend`'s kernels.
    """
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    check_backend(backend)
    if not isinstance(calibration, torch.Tensor) or calibration.ndim < 2 or len(calibration) == 0:
        raise KdqError("calibration must be a non-empty (N, ...) tensor of model inputs")
    skip = check_skip(model, skip)
    mapping = build_qconfig_mapping(backend, observer, per_channel, skip)
    float_model = copy.deepcopy(model).cpu().eval()
    calibration = calibration.detach().cpu().float()
    prepared = fx_call(
        prepare_fx, float_model, float_model, mapping, (calibration[:1],),
        prepare_custom_config=prepare_custom_config(skip),
    )
    with torch.no_grad():
        for i in range(0, len(calibration), batch_size):
            prepared(calibration[i : i + batch_size])
    quantized = fx_call(convert_fx, float_model, prepared)
    quantized.kdq_quant = {
        "kind": "static", "backend": backend, "observer": observer, "per_channel": per_channel,
        "skip": skip, "input_shape": list(calibration.shape[1:]),
    }
    return quantized


# What dynamic quantization converts: the layer types of PyTorch's own LSTM and BERT tutorials.
# Exact types: MultiheadAttention's out_proj (NonDynamicallyQuantizableLinear) stays float, as
# attention reads its weight as a tensor.
DYNAMIC_LAYERS = (nn.Linear, nn.LSTM, nn.GRU)


def quantize_dynamic(model: nn.Module, *, dtype: torch.dtype = torch.qint8) -> nn.Module:
    """A copy of `model` whose Linear, LSTM and GRU layers hold int8 (or float16) weights.

    Activations are quantized on the fly, so no calibration data is needed. Conv layers stay
    float (PyTorch has no dynamic conv kernels): for conv nets use `quantize_static`.
    Transformer layers keep working: their feed-forward Linear layers are quantized and the
    layers run their reference (non-fused) code path, since the fused one needs float weights.
    """
    if dtype not in (torch.qint8, torch.float16):
        raise KdqError(f"dynamic quantization dtype must be torch.qint8 or torch.float16, got {dtype}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).cpu().eval(), set(DYNAMIC_LAYERS), dtype=dtype
        )
    _disable_transformer_fast_path(quantized)
    quantized.kdq_quant = {"kind": "dynamic", "backend": torch.backends.quantized.engine, "dtype": str(dtype).removeprefix("torch.")}
    return quantized


def _disable_transformer_fast_path(model: nn.Module) -> None:
    """Send transformer layers down their reference path, which calls the int8 Linear modules.

    The fused inference path reads `linear1.weight` as a tensor; on a dynamic int8 Linear it is
    a method, and forward fails ("'function' object has no attribute 'device'"). Both flags
    only select between the fused and the reference path, and only on this copy.
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            module.activation_relu_or_gelu = 0  # the layer's own "fused path unavailable" marker
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False  # the encoder's padded-batch fast path
