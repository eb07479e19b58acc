"""Quantization-aware training: fake-quantized FX graph, a freeze schedule, conversion to int8.

Train the prepared model with `kdq.engine.fit` (optionally with a `Distiller` objective for
QAT + KD), passing `on_epoch_start=qat_freeze_callback(model, ...)`, then `convert_qat`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.ao.quantization import QConfig, get_default_qat_qconfig_mapping
from torch.ao.quantization.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize

from kdq.quant.ptq import check_backend, fx_call


def qat_qconfig_mapping(backend: str, per_channel: bool = True):
    """torch's QAT defaults for `backend`, with per-tensor weights when `per_channel` is False."""
    mapping = get_default_qat_qconfig_mapping(backend)
    if not per_channel:
        reduce_range = backend in ("x86", "fbgemm")  # same 7-bit activation rule as static PTQ
        act = FusedMovingAvgObsFakeQuantize.with_args(
            observer=torch.ao.quantization.MovingAverageMinMaxObserver,
            quant_min=0, quant_max=127 if reduce_range else 255, dtype=torch.quint8,
        )
        weight = FakeQuantize.with_args(
            observer=torch.ao.quantization.MovingAverageMinMaxObserver,
            quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
        )
        mapping.set_global(QConfig(activation=act, weight=weight))
    return mapping


def prepare_qat(model: nn.Module, example: torch.Tensor, *, backend: str = "x86", per_channel: bool = True) -> nn.Module:
    """A fake-quantized, trainable copy of `model` (conv-bn-relu fused with BN folding simulated).

    `example` is one batch of inputs used for tracing. The original model is not modified.
    """
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    check_backend(backend)
    float_model = copy.deepcopy(model).cpu().train()  # prepare_qat_fx requires train mode
    example = example.detach().cpu().float()
    prepared = fx_call(prepare_qat_fx, float_model, float_model, qat_qconfig_mapping(backend, per_channel), (example,))
    prepared.kdq_quant = {
        "kind": "qat", "backend": backend, "per_channel": per_channel, "observer": "moving_average",
        "skip": [], "input_shape": list(example.shape[1:]),
    }
    return prepared


def _freeze_bn(module: nn.Module) -> None:
    torch.ao.nn.intrinsic.qat.freeze_bn_stats(module)  # fused conv-bn(-relu): stops stat updates
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        # A BN that was not fused (e.g. after an add) runs in train mode again each epoch: a
        # momentum of 0 keeps its running statistics fixed even so.
        module.momentum = 0.0


def apply_qat_freeze(model: nn.Module, epoch: int, *, freeze_bn_epoch: int | None, freeze_observer_epoch: int | None) -> None:
    """Freeze BN statistics from `freeze_bn_epoch` and observers from `freeze_observer_epoch` (0-based).

    Idempotent and cumulative, so calling it at a resumed epoch restores the frozen state too.
    None never freezes.
    """
    if freeze_bn_epoch is not None and epoch >= freeze_bn_epoch:
        model.apply(_freeze_bn)
    if freeze_observer_epoch is not None and epoch >= freeze_observer_epoch:
        # Quantization ranges stop moving; fake quantization itself stays on.
        model.apply(torch.ao.quantization.disable_observer)


def qat_freeze_callback(
    model: nn.Module, *, freeze_bn_epoch: int | None = None, freeze_observer_epoch: int | None = None
) -> Callable[[int], None]:
    """An `on_epoch_start` hook for `kdq.engine.fit` that applies the freeze schedule to `model`."""

    def on_epoch_start(epoch: int) -> None:
        apply_qat_freeze(model, epoch, freeze_bn_epoch=freeze_bn_epoch, freeze_observer_epoch=freeze_observer_epoch)

    return on_epoch_start


def convert_qat(model: nn.Module) -> nn.Module:
    """A real int8 model from a QAT-trained one (a copy, in eval mode, on the CPU)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    recipe = getattr(model, "kdq_quant", None)
    if recipe is not None:
        check_backend(recipe["backend"])
    prepared = copy.deepcopy(model).cpu().eval()
    quantized = fx_call(convert_fx, prepared, prepared)
    if recipe is not None:
        quantized.kdq_quant = dict(recipe)
    return quantized
