"""Unstructured magnitude pruning: the smallest weights of every conv and linear layer set to zero.

    config = Magnitude(0.9, scope="global")
    prune_magnitude(model, config)                # one-shot: masks computed, then made permanent

    attach_masks(model, config)                   # fine-tuning: masks kept as buffers
    fit(model, data, cfg, out, on_epoch_start=GradualSchedule(0.9, epochs=10).on_epoch_start(model))
    make_permanent(model)                         # plain weights with zeros again

Targets are the `weight` of every nn.Conv1d, nn.Conv2d and nn.Linear, the classifier (`fc`)
included unless skipped; biases and batch norm are never pruned. A pruned weight is an exact
zero, so the model keeps its shape and its dense kernels: it computes no faster (ordinary
convolutions and matrix products multiply by zeros as by anything else). What sparsity saves
is space on disk, through kdq.prune.sparse; a model that runs faster needs its channels
removed (kdq.prune.channels).

During fine-tuning a target is reparametrised by torch.nn.utils.prune: its state holds
`weight_orig` and a `weight_mask` buffer, and every forward uses their product. The masks are
part of `model.state_dict()`, so kdq.engine.fit's checkpoints and best-epoch weights keep them,
and a resumed run restores them bit for bit, provided the freshly built model had its masks
attached (with the same `skip`) before the checkpoint was loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from kdq.errors import KdqError, short_repr, suggest

SCOPES = ("layer", "global")
TARGET_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def check_sparsity(value: Any, what: str = "sparsity") -> float:
    """`value` as a float if it is a number in [0, 1), else a KdqError naming the fix."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value < 1
    if not ok:
        raise KdqError(f"{what} must be a number in [0, 1) (the fraction of weights set to zero, e.g. 0.9), "
                       f"got {short_repr(value)}")
    return float(value)


def _check_scope(scope: Any) -> str:
    if scope not in SCOPES:
        raise KdqError(f"scope must be layer (each layer to the same sparsity) or global (one magnitude threshold "
                       f"over all layers), got {short_repr(scope)}")
    return scope


def _check_skip(skip: Any) -> tuple[str, ...]:
    names = (skip,) if isinstance(skip, str) else skip
    names = tuple(names) if isinstance(names, Iterable) and not isinstance(names, (bytes, dict)) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise KdqError(f"skip must be a list of layer names, got {short_repr(skip)}")
    return names


@dataclass(frozen=True)
class Magnitude:
    """Unstructured magnitude pruning: set the `sparsity` fraction of smallest weights to zero.

    `scope` "layer" prunes each target layer to the same sparsity; "global" ranks the weights
    of all targets together by magnitude (one threshold), so layers end at different sparsities
    (large layers, with many redundant weights, lose more). `skip` names modules (layers, or
    blocks containing them) left dense.
    """

    sparsity: float
    scope: str = "layer"
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        _check_scope(self.scope)
        object.__setattr__(self, "skip", _check_skip(self.skip))


@dataclass(frozen=True)
class GradualSchedule:
    """Zhu & Gupta's gradual pruning schedule, one mask update at the start of each epoch.

    From "To prune, or not to prune: exploring the efficacy of pruning for model compression"
    (M. Zhu, S. Gupta, 2017, arXiv:1710.01878): the sparsity rises from `initial` to `final`
    along a cubic,

        s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / n) ** 3,   t_0 <= t <= t_0 + n,

    fast at first, while many weights are redundant, then ever more slowly. The paper updates
    the masks every few hundred steps; kdq updates them once per epoch, so t is the epoch,
    t_0 is `start` and t_0 + n is `end`. Epochs before `start` train dense; from `end` on the
    sparsity is `final` and the remaining epochs only recover accuracy. `end` defaults to half
    way through the epochs after `start`. A weight pruned once stays pruned (masks only grow).

    `scope` and `skip` are as in Magnitude.
    """

    final: float
    epochs: int
    initial: float = 0.0
    start: int = 0
    end: int | None = None
    scope: str = "layer"
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        final = check_sparsity(self.final, "final sparsity")
        initial = check_sparsity(self.initial, "initial sparsity")
        if initial > final:
            raise KdqError(f"initial sparsity {initial:g} is above the final sparsity {final:g}; "
                           "a gradual schedule only prunes more over time")
        epochs = self.epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise KdqError(f"a gradual pruning schedule needs epochs >= 1, got {short_repr(epochs)}")
        start = self.start
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < epochs:
            raise KdqError(f"the pruning start epoch must be in 0..{epochs - 1} (0-based, before the last epoch), "
                           f"got {short_repr(start)}")
        end = start + (epochs - start) // 2 if self.end is None else self.end
        if isinstance(end, bool) or not isinstance(end, int) or not start <= end < epochs:
            raise KdqError(f"the epoch reaching the final sparsity must be in {start}..{epochs - 1} (from the start "
                           f"epoch to the last, 0-based), got {short_repr(end)}")
        for name, value in (("final", final), ("initial", initial), ("end", end)):
            object.__setattr__(self, name, value)
        _check_scope(self.scope)
        object.__setattr__(self, "skip", _check_skip(self.skip))

    def sparsity_at(self, epoch: int) -> float:
        """The sparsity the masks have during `epoch` (0-based)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise KdqError(f"epoch must be an integer >= 0, got {short_repr(epoch)}")
        if epoch < self.start:
            return 0.0
        if epoch >= self.end:
            return self.final
        left = 1 - (epoch - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * left**3

    def on_epoch_start(self, model: nn.Module) -> Callable[[int], None]:
        """A callback for kdq.engine.fit(on_epoch_start=...): the masks of `model` (attached
        with attach_masks) are recomputed to `sparsity_at(epoch)` before each epoch."""
        if not masked_layers(model):
            raise KdqError("the model has no pruning masks; call attach_masks(model, schedule) before fit")

        def update(epoch: int) -> None:
            update_masks(model, self.sparsity_at(epoch), self.scope)

        return update

    def finish(self, model: nn.Module) -> dict[str, Any]:
        """Bring the masks to the final sparsity (after fit restored an earlier best epoch)."""
        return update_masks(model, self.final, self.scope)


# ---- the layers pruned


def target_layers(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The conv and linear layers whose weights magnitude pruning sets to zero, by module name.

    A name in `skip` leaves that layer dense, or every layer inside that module; a name that is
    no module of `model` (or holds no such layer) is a KdqError with the closest valid names.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, TARGET_TYPES)}
    skipped: set[str] = set()
    for name in _check_skip(skip):
        inside = {n for n in layers if n == name or n.startswith(f"{name}.")}
        if not inside:
            containers = {n.rsplit(".", k)[0] for n in layers for k in range(1, n.count(".") + 1)}
            raise KdqError(f"no layer {name!r} to skip in {type(model).__name__}"
                           f"{suggest(name, [*layers, *containers]) or f' (its layers: {_some(layers)})'}; "
                           "skip takes module names as in model.named_modules()")
        skipped |= inside
    return {n: m for n, m in layers.items() if n not in skipped}


def _some(names: Iterable[str], count: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def _is_masked(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight_mask", None), torch.Tensor) and hasattr(module, "weight_orig")


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of `model` carrying a pruning mask (attach_masks), by module name."""
    return {name: m for name, m in model.named_modules() if _is_masked(m)}


def effective_weight(module: nn.Module) -> torch.Tensor:
    """A layer's weight as its forward uses it: weight_orig * weight_mask when masked."""
    if _is_masked(module):
        return module.weight_orig * module.weight_mask
    return module.weight


# ---- masks


def attach_masks(model: nn.Module, config: Magnitude | GradualSchedule) -> dict[str, nn.Module]:
    """Reparametrise every target of `config` (not in its `skip`) to weight_orig * weight_mask.

    Each mask starts as the layer's current nonzeros (all ones for a dense layer), so a model
    pruned earlier and made permanent keeps its zeros while it is fine-tuned. Layers already
    masked are left as they are. Call it before kdq.engine.fit, on the model that resumes too:
    the state_dict keys must be the checkpoint's. Returns the masked layers.
    """
    for module in target_layers(model, config.skip).values():
        if not _is_masked(module):
            prune.custom_from_mask(module, "weight", module.weight.detach() != 0)
    return masked_layers(model)


def _keep(magnitudes: torch.Tensor, pruned: int) -> torch.Tensor:
    """False at the `pruned` smallest of a flat tensor of magnitudes, True elsewhere.

    A stable sort breaks ties by position, so the same weights give the same mask on every run
    (weights already pruned are zeros, the smallest, and stay pruned).
    """
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    if pruned > 0:
        keep[torch.sort(magnitudes, stable=True).indices[:pruned]] = False
    return keep


@torch.no_grad()
def update_masks(model: nn.Module, sparsity: float, scope: str = "layer") -> dict[str, Any]:
    """Recompute the masks of `model` (attach_masks) from the magnitudes of its effective
    weights, so that `sparsity` of the masked weights are zero: in each layer (scope "layer")
    or over all of them together ("global"). Masks only grow: a weight pruned already stays
    pruned, also when `sparsity` is lower than before. Returns sparsity_of(model)."""
    sparsity, scope = check_sparsity(sparsity), _check_scope(scope)
    layers = list(masked_layers(model).values())
    if not layers:
        raise KdqError("the model has no pruning masks; call attach_masks(model, config) first")
    if scope == "layer":
        for m in layers:
            keep = _keep(effective_weight(m).abs().flatten(), round(sparsity * m.weight_mask.numel()))
            m.weight_mask.mul_(keep.view_as(m.weight_mask))
    else:
        magnitudes = torch.cat([effective_weight(m).abs().flatten() for m in layers])
        keep = _keep(magnitudes, round(sparsity * magnitudes.numel()))
        for m, part in zip(layers, keep.split([m.weight_mask.numel() for m in layers])):
            m.weight_mask.mul_(part.view_as(m.weight_mask))
    return sparsity_of(model)


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove the masks: each masked weight becomes a plain parameter holding its zeros, and
    the state_dict keys are those of the unpruned model again. Returns `model`."""
    for module in masked_layers(model).values():
        prune.remove(module, "weight")
    return model


def prune_magnitude(model: nn.Module, config: Magnitude, *, permanent: bool = True) -> dict[str, Any]:
    """One-shot magnitude pruning of `model` in place; masks made permanent unless `permanent`
    is False (to fine-tune with them). Returns sparsity_of(model)."""
    if not isinstance(config, Magnitude):
        raise KdqError(f"prune_magnitude takes a Magnitude config, got {type(config).__name__}")
    attach_masks(model, config)
    update_masks(model, config.sparsity, config.scope)
    if permanent:
        make_permanent(model)
    return sparsity_of(model)


@torch.no_grad()
def sparsity_of(model: nn.Module) -> dict[str, Any]:
    """The fraction of zeros in the conv and linear weights of `model`, masked or plain:
    {"sparsity": over all of them, "layers": {name: per layer}, "weights": their count}."""
    layers: dict[str, float] = {}
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, TARGET_TYPES):
            weight = effective_weight(module)
            n_zero, n = int((weight == 0).sum()), weight.numel()
            layers[name] = n_zero / n if n else 0.0
            zeros, total = zeros + n_zero, total + n
    return {"sparsity": zeros / total if total else 0.0, "layers": layers, "weights": total}


def effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every masked weight as its plain effective weight (the keys of
    the unpruned model), without changing `model`: what a pruned model is saved as."""
    masked = {(f"{name}." if name else "") + "weight": m for name, m in masked_layers(model).items()}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        base = key.removesuffix("_orig").removesuffix("_mask")
        if base not in masked:
            state[key] = value
        elif key.endswith("_orig"):  # in the place the plain weight had
            state[base] = effective_weight(masked[base]).detach()
    return state
