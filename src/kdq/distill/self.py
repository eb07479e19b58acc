"""Self-distillation: "Be Your Own Teacher" (Zhang et al., ICCV 2019).

Auxiliary heads on the student's intermediate stages are taught by its own deepest classifier:

    loss = CE(deep, y) + sum over heads i of
           (1 - alpha) * CE(head_i, y)
           + alpha * T^2 * KL(softmax(deep / T) || softmax(head_i / T))
           + feature_weight * mean over the batch of ||f_i - f_deep||^2

f_deep is the input of the model's final `fc` (the pooled embedding) and f_i the head's
bottleneck output, of the same width. The deepest logits and f_deep are detached: the heads
learn from them, the deepest classifier learns from the labels alone (as in the authors'
code). Defaults follow the authors' code: alpha 0.3, T 3, feature weight 0.03. Where kdq
differs from it: the soft term is a KL divergence scaled by T^2, as kdq's Hinton KD (the
code's soft cross-entropy has the same gradient without the T^2), and the hint term is the
paper's squared L2 distance per sample, averaged over the batch (the code's torch.dist is the
unsquared norm over the whole batch).

The heads are the objective's trainable parts (optimised, checkpointed, restored bit-exact on
resume, kept in best_objective.safetensors) and never part of the saved model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdq.data import Split
from kdq.distill.hooks import FeatureTaps
from kdq.distill.methods import is_number
from kdq.distill.teacher import unwrap
from kdq.engine.objectives import Objective
from kdq.errors import KdqError, short_repr


class AuxHead(nn.Module):
    """A light bottleneck to the deepest feature's width, then a linear classifier.

    Image stages: average-pooled to at most 4x4 (the paper's heads downsample with strided
    convolutions; pooling first keeps a head's cost small beside its stage), 1x1 conv, BN,
    ReLU, global pool. Vector stages: linear and ReLU.
    """

    def __init__(self, shape: Sequence[int], width: int, num_classes: int) -> None:
        super().__init__()
        if len(shape) == 3:
            size = (min(4, shape[1]), min(4, shape[2]))
            self.bottleneck = nn.Sequential(nn.AdaptiveAvgPool2d(size), nn.Conv2d(shape[0], width, 1, bias=False),
                                            nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                                            nn.Flatten())
        elif len(shape) == 1:
            self.bottleneck = nn.Sequential(nn.Linear(shape[0], width), nn.ReLU(inplace=True))
        else:
            raise ValueError(f"a head reads (channels, height, width) or (features,) outputs, got {tuple(shape)}")
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.bottleneck(x)
        return feature, self.fc(feature)


def byot_loss(head_logits: Sequence[torch.Tensor], head_features: Sequence[torch.Tensor], logits: torch.Tensor,
              feature: torch.Tensor, targets: torch.Tensor, *, temperature: float = 3.0, alpha: float = 0.3,
              feature_weight: float = 0.03, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """The module docstring's loss; terms: ce (deepest), head<i>_ce, head<i>_kl, head<i>_feature."""
    t = temperature
    logits = _wide(logits)
    ce = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    soft = F.softmax(logits.detach() / t, dim=1)
    deep = torch.flatten(_wide(feature.detach()), 1)
    total, terms = ce, {"ce": ce}
    for i, (head, f) in enumerate(zip(head_logits, head_features), 1):
        head = _wide(head)
        head_ce = F.cross_entropy(head, targets, label_smoothing=label_smoothing)
        kl = F.kl_div(F.log_softmax(head / t, dim=1), soft, reduction="batchmean") * t * t
        hint = (_wide(f) - deep).pow(2).sum(dim=1).mean()
        total = total + (1 - alpha) * head_ce + alpha * kl + feature_weight * hint
        terms.update({f"head{i}_ce": head_ce, f"head{i}_kl": kl, f"head{i}_feature": hint})
    return {"loss": total, **terms}


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision outputs (autocast) in float32 for the softmax; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_self_options(temperature: Any, alpha: Any, feature_weight: Any, layers: Any) -> None:
    """One KdqError line for a value the objective cannot take."""
    if not (is_number(temperature) and 0 < temperature < math.inf):
        raise KdqError(f"temperature must be a finite number > 0, got {short_repr(temperature)}")
    if not (is_number(alpha) and 0 <= alpha <= 1):
        raise KdqError(f"alpha must be a number in [0, 1], got {short_repr(alpha)}")
    if not (is_number(feature_weight) and 0 <= feature_weight < math.inf):
        raise KdqError(f"feature_weight must be a finite number >= 0, got {short_repr(feature_weight)}")
    if layers is not None and (isinstance(layers, str) or not isinstance(layers, Sequence) or not layers
                               or not all(isinstance(n, str) and n for n in layers)):
        raise KdqError(f"layers must be a non-empty list of module names, e.g. [layer1, layer2], got {short_repr(layers)}")
    if layers is not None and len(set(layers)) != len(layers):
        raise KdqError(f"layers names a module twice: {list(layers)}; give each once")


def head_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """The layers that get a head: `layers`, else every feature_layers() stage but the deepest
    (whose output already feeds the model's own classifier)."""
    net = unwrap(model)
    if not isinstance(getattr(net, "fc", None), nn.Linear):
        raise KdqError(f"{type(net).__name__} has no final nn.Linear named fc, whose input the heads are taught to "
                       "match; use a zoo model or name its classifier fc")
    if layers is None:
        named = getattr(net, "feature_layers", None)
        if not callable(named):
            raise KdqError(f"{type(net).__name__} names no feature layers (feature_layers()); "
                           "name the layers to put heads on with --layer")
        layers = list(named())[:-1]
        if not layers:
            raise KdqError(f"{type(net).__name__} has fewer than two feature stages, so no intermediate stage "
                           "to put a head on; name the layers with --layer")
    FeatureTaps(net, list(layers)).remove()  # an unknown name fails here, listing the valid ones
    return list(layers)


class SelfDistiller(Objective):
    """Be Your Own Teacher as a training objective (see the module docstring).

        objective = SelfDistiller()                  # kdq.engine.fit(model, data, cfg, objective=objective)

    The heads are built in `prepare`, from the shapes one two-sample pass gives.
    """

    def __init__(self, temperature: float = 3.0, alpha: float = 0.3, feature_weight: float = 0.03,
                 layers: Sequence[str] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        check_self_options(temperature, alpha, feature_weight, layers)
        self.temperature, self.alpha, self.feature_weight = float(temperature), float(alpha), float(feature_weight)
        self.layers = list(layers) if layers is not None else None
        self.label_smoothing = label_smoothing
        self.heads = nn.ModuleList()
        self.taps: FeatureTaps | None = None
        self.deep: FeatureTaps | None = None

    def prepare(self, model: nn.Module, train: Split, device: torch.device) -> None:
        net = unwrap(model)
        self.layers = head_layers(net, self.layers)
        self.taps = FeatureTaps(net, self.layers)
        self.deep = FeatureTaps(net, ["fc"], inputs=True)
        was_training = model.training
        model.eval()  # no batch-norm statistics move
        with torch.no_grad():
            model(train.x[:2].to(device))
        model.train(was_training)
        width = torch.flatten(self.deep.features["fc"], 1).shape[1]
        classes = net.fc.out_features
        self.heads = nn.ModuleList()
        for name in self.layers:
            shape = tuple(self.taps.features[name].shape[1:])
            try:
                self.heads.append(AuxHead(shape, width, classes))
            except ValueError as exc:
                raise KdqError(f"layer {name!r}: {exc}; choose another with --layer") from None
        super().prepare(model, train, device)

    def release(self) -> None:
        """Take the taps off the trained model (its later forward passes keep no features)."""
        for taps in (self.taps, self.deep):
            if taps is not None:
                taps.remove()
        self.taps = self.deep = None

    def forward(self, logits, targets, inputs, indices):  # noqa: ANN001 - see kdq.engine.objectives
        assert self.taps is not None and self.deep is not None, "prepare() runs before the first step"
        outs = [head(self.taps.features[name]) for name, head in zip(self.layers, self.heads)]
        return byot_loss([o for _, o in outs], [f for f, _ in outs], logits, self.deep.features["fc"], targets,
                         temperature=self.temperature, alpha=self.alpha, feature_weight=self.feature_weight,
                         label_smoothing=self.label_smoothing)
