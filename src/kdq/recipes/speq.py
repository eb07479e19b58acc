"""SPEQ (Boo et al. 2021): self-distillation across precisions.

One set of weights; each step a teacher pass draws every layer's activation width from
`teacher_bits`, and the student pass at the target width learns from it:
cross-entropy + `cosine_weight` * (1 - cos(p_student, p_teacher)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdq.data import DataBundle
from kdq.engine import count_params
from kdq.engine.objectives import Objective
from kdq.errors import KdqError
from kdq.quant.lowbit import quantize_lowbit
from kdq.quant.lowbit.layers import lowbit_layers
from kdq.recipes.common import CHECKS, RECIPES, each_scheme, finished, schemes
from kdq.stages.lowbit import fine_tune_config, lowbit_config, lowbit_source, train_lowbit

FLOAT_BITS = 32  # in teacher_bits: leave that layer's activations float


@contextmanager
def _statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Batch norm running statistics and quantizer observers stay as they are inside the block."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    quantizers = [q for layer in lowbit_layers(model).values() for q in (layer.weight_quantizer, layer.act_quantizer)
                  if q is not None]
    modes = [q.training for q in quantizers]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    for q in quantizers:
        q.train(False)
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for q, mode in zip(quantizers, modes):
            q.train(mode)


@contextmanager
def _float_inputs(layer: nn.Module) -> Iterator[None]:
    quantizer, layer.act_quantizer = layer.act_quantizer, None
    try:
        yield
    finally:
        layer.act_quantizer = quantizer


def _teacher_bits(act_bits: int | None, teacher_bits: Sequence[int] | None) -> list[int]:
    if act_bits is None:
        raise KdqError("speq varies activation precision: give a scheme with activation bits, such as w4a4")
    if teacher_bits is None:
        return [act_bits, 8 if act_bits < 8 else 16]
    choices = list(teacher_bits) if isinstance(teacher_bits, (list, tuple)) else None
    if not choices or not all(isinstance(b, int) and not isinstance(b, bool) and (1 <= b <= 16 or b == FLOAT_BITS)
                              for b in choices):
        raise KdqError(f"teacher_bits must be a list of activation widths from 1 to 16, or 32 for float, got {teacher_bits!r}")
    return choices


class StochasticPrecision(Objective):
    """SPEQ's objective. The teacher is the student's own weights, run without gradients with
    each target-width activation quantizer at a width drawn from `choices` (32: float); batch
    norm statistics and quantizer state do not move during that pass. The student is held, not
    a part: it is the model being trained."""

    def __init__(self, model: nn.Module, act_bits: int, choices: Sequence[int], temperature: float = 1.0,
                 cosine_weight: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        if not (0 < temperature < math.inf and 0 <= cosine_weight < math.inf):
            raise KdqError(f"speq needs a finite temperature > 0 and cosine_weight >= 0, got {temperature} and {cosine_weight}")
        self.hold("model", model)
        self.choices = list(choices)
        self.layers = [layer for layer in lowbit_layers(model).values()
                       if layer.act_quantizer is not None and layer.act_quantizer.bits == act_bits]
        self.temperature, self.cosine_weight = temperature, cosine_weight
        self.generator = torch.Generator().manual_seed(seed)

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        draws = torch.randint(len(self.choices), (len(self.layers),), generator=self.generator).tolist()
        with torch.no_grad(), ExitStack() as stack:
            stack.enter_context(_statistics_frozen(self.model))
            for layer, draw in zip(self.layers, draws):
                bits = self.choices[draw]
                stack.enter_context(_float_inputs(layer) if bits == FLOAT_BITS else layer.act_quantizer.at_bits(bits))
            return self.model(inputs)

    def forward(self, logits, targets, inputs, indices):  # noqa: ANN001 - see kdq.engine.objectives
        teacher = self.teacher_logits(inputs)
        ce = F.cross_entropy(logits.float(), targets)
        t = self.temperature
        cos = F.cosine_similarity(F.softmax(logits.float() / t, 1), F.softmax(teacher.float() / t, 1), dim=1)
        cosine = (1 - cos).mean()
        return {"loss": ce + self.cosine_weight * cosine, "ce": ce, "cosine": cosine}


@RECIPES.register("speq")
def speq(source: str | Path, out: str | Path, *, bits: str | Sequence[str], teacher_bits: Sequence[int] | None = None,
         temperature: float = 1.0, cosine_weight: float = 1.0, quantizer: str = "lsq",
         act_quantizer: str | None = None, first_last_bits: int | None = 8, data: str | DataBundle | None = None,
         resume: bool = False, **train: Any) -> dict[str, dict[str, Any]]:
    """SPEQ per scheme, starting from `source`. `teacher_bits` are the widths the teacher pass
    draws from per layer and step (default: the target and 8, or 16 when the target is 8+)."""
    results = {}
    for scheme in each_scheme("speq", bits, train.get("seed", 0)):
        run_dir = Path(out) / scheme
        done = finished(run_dir, resume)
        if done is None:
            config = lowbit_config(scheme, quantizer, act_quantizer, first_last_bits)
            choices = _teacher_bits(config.act_bits, teacher_bits)
            cfg = fine_tune_config(train)
            model, meta, bundle = lowbit_source(source, data)
            student = quantize_lowbit(model, config)
            objective = StochasticPrecision(student, config.act_bits, choices, temperature, cosine_weight, cfg.seed)
            record = {"command": "recipe", "recipe": "speq", "source": str(source), "bits": scheme,
                      "lowbit": config.to_dict(), "teacher_bits": choices, "temperature": temperature,
                      "cosine_weight": cosine_weight}
            done = train_lowbit(student, run_dir, bundle, meta, cfg, record, objective=objective,
                                resume=resume, float_params=count_params(model))
        results[scheme] = {**done, "run_dir": str(run_dir)}
    return results


def _check(options: dict[str, Any]) -> None:
    for scheme in schemes(options.get("bits")):
        _teacher_bits(lowbit_config(scheme).act_bits, options.get("teacher_bits"))
    weight = options.get("cosine_weight", 1.0)
    if not (isinstance(weight, (int, float)) and 0 <= weight < math.inf):
        raise KdqError(f"cosine_weight must be a finite number >= 0, got {weight!r}")


CHECKS["speq"] = _check
