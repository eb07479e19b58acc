"""Feature distillation methods (see kdq.distill.methods for the contract).

Both read `features`: lists of intermediate outputs, one per tapped (student layer, teacher
layer) pair, each (batch, channels, h, w) for convolutional stages or (batch, dim) for MLP
blocks. Neither includes the cross-entropy: the objective adds it once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdq.distill.methods import DistillLoss, Shape, check_positive, register
from kdq.errors import KdqError

FIX = "choose layers of matching resolution with --feature"


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 at least: fp16/bf16 under autocast lose small squared differences; float64 stays
    float64 (gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


def _pairs(student: Sequence[torch.Tensor] | torch.Tensor,
           teacher: Sequence[torch.Tensor] | torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    student = [student] if isinstance(student, torch.Tensor) else list(student)
    teacher = [teacher] if isinstance(teacher, torch.Tensor) else list(teacher)
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need as many student as teacher features (at least one), "
                         f"got {len(student)} and {len(teacher)}")
    return list(zip(student, teacher))


def _shape_pairs(student: Sequence[Shape], teacher: Sequence[Shape]) -> list[tuple[Shape, Shape]]:
    if len(student) != len(teacher) or not student:
        raise KdqError(f"got {len(student)} student and {len(teacher)} teacher features; pair them one to one "
                       "with --feature STUDENT_LAYER=TEACHER_LAYER")
    return [(tuple(s), tuple(t)) for s, t in zip(student, teacher)]


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise KdqError(f"{name} must be true or false, got {value!r}")
    return value


def _ratios(i: int, s: Shape, t: Shape) -> tuple[str, tuple[int, ...]]:
    """How pair i's student (c, h, w) maps onto the teacher's: ("down" | "up", per-axis integer factors).

    "down" (student larger or equal on every axis) or "up" (smaller or equal); a pair whose
    sizes are not integer multiples, or larger on one axis and smaller on the other, is refused.
    """
    down = all(a >= b for a, b in zip(s[1:], t[1:]))
    up = all(a <= b for a, b in zip(s[1:], t[1:]))
    big, small = (s[1:], t[1:]) if down else (t[1:], s[1:])
    if not (down or up) or any(b % a for a, b in zip(small, big)):
        raise KdqError(f"feature pair {i}: student {s} and teacher {t} have spatial sizes that are neither equal "
                       f"nor integer multiples of each other; {FIX}")
    return ("down" if down else "up"), tuple(b // a for a, b in zip(small, big))


def _conv_adapter(s: Shape, t: Shape, direction: str, factors: tuple[int, ...], relu: bool) -> nn.Module:
    """conv (+BN, +ReLU) from the student's (c, h, w) to the teacher's, as RepDistiller's ConvReg.

    Equal size: 1x1 conv. Student k times larger: kernel 2k-1, stride k, padding k-1 (3x3 stride 2
    at k=2, as ConvReg). Student k times smaller: transposed conv, kernel 2k, stride k (4x4 stride 2
    padding 1 at k=2, as ConvReg). An axis with factor 1 gets kernel 1.
    """
    if direction == "down":
        conv: nn.Module = nn.Conv2d(s[0], t[0], kernel_size=tuple(2 * k - 1 for k in factors), stride=factors,
                                    padding=tuple(k - 1 for k in factors))
    else:
        # output = (n-1)k - 2p + K + op = nk for K=2k, p=ceil(k/2), op=2p-k; K=1 keeps a factor-1 axis
        kernel = tuple(2 * k if k > 1 else 1 for k in factors)
        pad = tuple(math.ceil(k / 2) if k > 1 else 0 for k in factors)
        conv = nn.ConvTranspose2d(s[0], t[0], kernel_size=kernel, stride=factors, padding=pad,
                                  output_padding=tuple(2 * p - k if k > 1 else 0 for p, k in zip(pad, factors)))
    layers = [conv, nn.BatchNorm2d(t[0])] + ([nn.ReLU()] if relu else [])
    return nn.Sequential(*layers)


@register("fitnet", "feature", "features", includes_ce=False, default_weight=100.0,
          paper="Romero, Ballas, Kahou, Chassang, Gatta & Bengio, FitNets: Hints for Thin Deep Nets, ICLR 2015")
class FitNetLoss(DistillLoss):
    """FitNets hints: the student's feature, through a learned adapter, regresses the teacher's.

    hint = sum over pairs j of mean((r_j(s_j) - t_j)^2)

    the mean over every element (batch, channels, positions) of pair j, r_j the adapter. The
    paper (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, eq. 3) writes
    1/2 ||u_h - r(v_g)||^2 for one hint layer with a convolutional regressor; kdq follows
    RepDistiller's HintLoss (an element mean, no 1/2) and its default weight 100 (RepDistiller
    scripts/run_cifar_distill.sh, `--distill hint -a 0 -b 100`: CE + 100 * hint). Several pairs
    are summed; the paper and RepDistiller hint one layer (RepDistiller: the second stage's
    output), so tapping only the middle pair reproduces them.

    Adapters, built in `setup`, one per pair whose shapes differ (identity otherwise, unless
    `always_adapt`): for (c, h, w) maps a conv + BatchNorm as RepDistiller's ConvReg (1x1 for
    equal sizes, strided conv when the student's map is k times larger, transposed conv when k
    times smaller); for (dim,) vectors a Linear. ConvReg also applies a ReLU, right when the
    teacher's tapped output is post-ReLU; the paper asks the regressor to share the hint
    layer's non-linearity. kdq's taps can be signed (pre-activation WRN groups, MobileNetV2
    linear bottlenecks), so no ReLU by default (`relu=True` adds it). RepDistiller always uses
    ConvReg, even between equal shapes: `always_adapt=True, relu=True` reproduces it.

    The paper trains in two stages: first the student's layers up to the guided layer and the
    adapter on the hint loss alone, then the whole student with KD. RepDistiller trains in one
    (CE + 100 * hint from the start), and so does kdq by default. This class is the hint
    term only; the two stages are the objective's schedule: `hint_epochs=N` with a second
    method (`kdq distill --method fitnet --method kd --hint-epochs N`, see Distiller).
    Returns a dict with `loss` and `hint` (equal).
    """

    def __init__(self, always_adapt: bool = False, relu: bool = False) -> None:
        super().__init__()
        self.always_adapt = _check_bool("always_adapt", always_adapt)
        self.relu = _check_bool("relu", relu)
        self.adapters: nn.ModuleList | None = None

    def setup(self, student: Sequence[Shape], teacher: Sequence[Shape], num_samples: int) -> None:
        adapters = []
        for i, (s, t) in enumerate(_shape_pairs(student, teacher)):
            if s == t and not self.always_adapt:
                adapters.append(nn.Identity())
            elif len(s) == len(t) == 3:
                adapters.append(_conv_adapter(s, t, *_ratios(i, s, t), relu=self.relu))
            elif len(s) == len(t) == 1:
                adapters.append(nn.Sequential(nn.Linear(s[0], t[0]), *([nn.ReLU()] if self.relu else [])))
            elif s == t:
                adapters.append(nn.Identity())
            else:
                raise KdqError(f"feature pair {i}: student {s} and teacher {t} cannot be bridged: fitnet adapts "
                               f"(channels, h, w) maps to maps and (dim,) vectors to vectors; {FIX}")
        self.adapters = nn.ModuleList(adapters)

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], targets: torch.Tensor,
                indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pairs = _pairs(student, teacher)
        if self.adapters is not None and len(self.adapters) != len(pairs):
            raise ValueError(f"fitnet was set up for {len(self.adapters)} feature pairs, got {len(pairs)}")
        hint: torch.Tensor | float = 0.0
        for i, (s, t) in enumerate(pairs):
            s = _wide(s)
            if self.adapters is not None:
                s = _wide(self.adapters[i](s))  # conv under autocast runs in half: widen its output again
            if s.shape != t.shape:
                raise RuntimeError(f"fitnet: feature pair {i} has shapes {tuple(s.shape)} and {tuple(t.shape)}; "
                                   "call setup() with the feature shapes first")
            hint = hint + F.mse_loss(s, _wide(t))
        return {"loss": hint, "hint": hint}


def _attention(f: torch.Tensor, p: float) -> torch.Tensor:
    """(batch, h*w): the mean over channels of |f|^p, L2-normalised per sample."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


@register("at", "feature", "features", includes_ce=False, default_weight=1000.0,
          paper="Zagoruyko & Komodakis, Paying More Attention to Attention: Improving the Performance of "
                "Convolutional Neural Networks via Attention Transfer, ICLR 2017")
class AttentionLoss(DistillLoss):
    """Attention transfer: the student's spatial attention maps match the teacher's.

    a(f) = normalize(vec(mean over channels of |f|^p))   (per sample, L2)
    at = sum over pairs j of mean over batch and positions of (a(s_j) - a(t_j))^2

    The paper (Zagoruyko & Komodakis, ICLR 2017, eq. 2) writes beta/2 * sum_j
    || a(s_j) - a(t_j) ||_2 with a sum over channels and the norm itself (not squared), and sets
    beta to 1000 divided by the batch size and the number of positions. Its code, which kdq
    follows (as RepDistiller's distiller_zoo/AT.py does), squares the difference and takes
    its mean over batch and positions (that mean is the paper's division of beta), sums the
    pairs, and weights the sum by beta = 1000 with no 1/2 (RepDistiller: `--distill attention
    -b 1000`, helper/loops.py sums the pairs): hence the default weight 1000. Mean and sum
    over channels agree after the normalisation. The code raises f to the power p (2); kdq
    takes |f|^p as the paper does, the same for even p.

    Channel counts may differ. When the spatial sizes differ, the larger map is average-pooled
    to the smaller one's (h, w) before the attention maps are taken, as RepDistiller does (it
    assumes square maps; the paper's pairs always match); a pair larger on one axis and
    smaller on the other is refused in `setup`. No trainable parts. Returns a dict with `loss` and `at` (equal).
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = check_positive("p", p)

    def setup(self, student: Sequence[Shape], teacher: Sequence[Shape], num_samples: int) -> None:
        for i, (s, t) in enumerate(_shape_pairs(student, teacher)):
            if len(s) != 3 or len(t) != 3:
                raise KdqError(f"feature pair {i}: student {s} and teacher {t}: attention transfer needs "
                               f"(channels, h, w) feature maps on both sides; {FIX}")
            larger = [a > b for a, b in zip(s[1:], t[1:])]
            smaller = [a < b for a, b in zip(s[1:], t[1:])]
            if any(larger) and any(smaller):
                raise KdqError(f"feature pair {i}: student {s} is larger than teacher {t} on one axis and smaller "
                               f"on the other, so neither can be pooled to the other; {FIX}")

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], targets: torch.Tensor,
                indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        at: torch.Tensor | float = 0.0
        for s, t in _pairs(student, teacher):
            s, t = _wide(s), _wide(t)
            if s.dim() == 4 and s.shape[2:] != t.shape[2:]:
                size = tuple(min(a, b) for a, b in zip(s.shape[2:], t.shape[2:]))
                s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
            at = at + (_attention(s, self.p) - _attention(t, self.p)).pow(2).mean()
        return {"loss": at, "at": at}
