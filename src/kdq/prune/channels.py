"""Structured pruning: whole channels removed, so the model is smaller and faster with ordinary kernels.

    report = prune_channels(model, example_inputs, Channels(ratio=0.5))           # half of every layer
    report = prune_channels(model, example_inputs, Channels(macs=2.0))            # half the MACs
    report = prune_channels(model, x, Channels(ratio=0.3, importance="taylor"), batches=[(x, y)])

Removing an output channel of one layer removes an input channel of every layer that reads
it, and channels joined by a residual addition, a depthwise convolution or a batch norm must go
together. Torch-Pruning (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023)
traces the model once and groups every set of coupled channels; kdq ranks each group's
channels by the chosen importance, decides how many go, and lets Torch-Pruning cut the
tensors. The classifier's outputs (the class count) are never pruned.

A pruned zoo model records its new layer sizes in `model.kdq_spec["widths"]`
(kdq.models.widths), so it is saved, reloaded, quantized and exported like any other run.
A user's own module is pruned too, but, as before, reloads only into a module the user builds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from kdq.engine import count_macs, count_params, device_of
from kdq.errors import KdqError, short_repr, suggest
from kdq.models import create_model
from kdq.models.widths import read_widths

IMPORTANCES = ("l1", "l2", "bn", "taylor")
SCOPES = ("layer", "global")
TARGETS = ("macs", "params")
# A search for a MACs or parameter target halves the ratio's interval this many times: far
# finer than one channel of any layer, at a few milliseconds a step (no tensor is cut).
SEARCH_STEPS = 30
_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class Channels:
    """Structured channel pruning: what to remove, ranked how.

    Exactly one of:
    - `ratio`: the fraction of channels removed, in [0, 1): from every layer (scope "layer":
      floor(ratio x channels) of each) or from all layers ranked together (scope "global": the
      weakest channels of the whole model, so layers end at different widths);
    - `macs` / `params`: a reduction factor instead (2.0: half the MACs), reached by searching
      the ratio.

    `importance` ranks channels: "l1" / "l2", the norm of each channel's weights over its whole
    group of coupled layers (Li et al. 2017, "Pruning Filters for Efficient ConvNets"); "bn",
    the magnitude of the batch-norm scale (Liu et al. 2017, "Learning Efficient Convolutional
    Networks through Network Slimming": layers without a batch norm are not pruned); "taylor",
    |sum of weight x gradient of the cross-entropy| per channel, the first-order Taylor estimate
    of the loss change when the channel goes (Molchanov et al. 2019, "Importance Estimation
    for Neural Network Pruning"), which needs `batches`. `skip` names modules (layers or
    blocks) whose output channels all stay.

    `round_to` keeps every pruned group's width a multiple of it (rounded up, never above the
    original width): 8 or 16 suit the blocked kernels of ONNX Runtime and oneDNN, which run
    odd widths (11, 45 channels) slower than the wider dense model.

    Every layer keeps at least one channel: a layer cannot lose all of them by the ratio
    (floor(ratio x n) < n for ratio < 1), and a global ranking passes over a layer's last
    channel and takes the next weakest elsewhere; an empty layer would cut the network in two.
    """

    ratio: float | None = None
    macs: float | None = None
    params: float | None = None
    importance: str = "l2"
    scope: str = "layer"
    skip: tuple[str, ...] = field(default=())
    round_to: int = 1

    def __post_init__(self) -> None:
        given = [k for k in ("ratio", *TARGETS) if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise KdqError(f"give exactly one of ratio (the fraction of channels removed, e.g. 0.5), macs or params "
                           f"(a reduction factor, e.g. 2.0 for half), got {what}")
        if self.ratio is not None:
            ok = _number(self.ratio) and 0 <= self.ratio < 1
            if not ok:
                raise KdqError(f"ratio must be a number in [0, 1) (the fraction of channels removed, e.g. 0.5), "
                               f"got {short_repr(self.ratio)}")
        for key in TARGETS:
            value = getattr(self, key)
            if value is not None and not (_number(value) and value > 1):
                raise KdqError(f"{key} must be a reduction factor > 1 (2.0: half the {'MACs' if key == 'macs' else key}), "
                               f"got {short_repr(value)}")
        if self.importance not in IMPORTANCES:
            raise KdqError(f"unknown importance {short_repr(self.importance)}{suggest(str(self.importance), IMPORTANCES)}; "
                           f"choose one of {', '.join(IMPORTANCES)}")
        if self.scope not in SCOPES:
            raise KdqError(f"scope must be layer (each layer loses the same fraction) or global (the weakest channels "
                           f"of the whole model go), got {short_repr(self.scope)}")
        skip = (self.skip,) if isinstance(self.skip, str) else self.skip
        skip = tuple(skip) if isinstance(skip, Iterable) and not isinstance(skip, (bytes, dict)) else None
        if skip is None or not all(isinstance(s, str) for s in skip):
            raise KdqError(f"skip must be a list of layer names, got {short_repr(self.skip)}")
        object.__setattr__(self, "skip", skip)
        if not (isinstance(self.round_to, int) and not isinstance(self.round_to, bool) and 1 <= self.round_to <= 1024):
            raise KdqError(f"round_to must be a whole number from 1 to 1024 (kept widths a multiple of it, e.g. 8), "
                           f"got {short_repr(self.round_to)}")

    @property
    def target(self) -> tuple[str, float] | None:
        """("macs" | "params", factor) when a reduction is asked for instead of a ratio."""
        return next(((k, float(getattr(self, k))) for k in TARGETS if getattr(self, k) is not None), None)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def prune_channels(
    model: nn.Module,
    example_inputs: torch.Tensor,
    config: Channels,
    *,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Remove channels from `model` in place, as `config` asks; return what changed.

    `example_inputs` is a batch of inputs the model takes (only its first sample is used, to
    trace the model and count MACs). `batches` (an iterable of (inputs, labels)) is needed by,
    and only read for, importance "taylor": the cross-entropy gradient is summed over them.
    The model's weights, batch-norm statistics and training mode are left as they were except
    for the channels removed (gradients that "taylor" accumulated are cleared). The report:
    the ratio asked (None for a target), `removed`, the fraction of the prunable channels
    removed, parameters and MACs before and after with their reduction factors, and each
    prunable layer's kept channels out of its original count.
    """
    if not isinstance(config, Channels):
        raise KdqError(f"config must be a kdq.prune.Channels, got {short_repr(config)}")
    if config.importance == "taylor" and batches is None:
        raise KdqError("importance taylor ranks channels by the loss gradient and needs data: pass "
                       "batches=[(inputs, labels), ...] (a few training batches), or use l2")
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2 or len(example_inputs) == 0:
        raise KdqError(f"example_inputs must be a batch of inputs, shape (N, ...), got {short_repr(example_inputs)}")
    example = example_inputs[:1].to(device_of(model))
    names = {m: n for n, m in model.named_modules()}
    skipped = _resolve_skip(model, config.skip)
    was_training = model.training
    model.eval()  # tracing runs forward passes: batch-norm statistics must not move
    try:
        positions, classifier = _trace(model, example)
        widths_before = {m: _out_size(m) for m in positions}
        params_before, macs_before = count_params(model), count_macs(model, example)
        if config.importance == "taylor":
            _accumulate_gradients(model, batches)
        graph = _Graph(model, example, config.importance, ignored=[classifier, *skipped], round_to=config.round_to)
        estimate = _Estimate(positions, params_before, macs_before)
        plan = graph.plan(config.ratio, config.scope) if config.ratio is not None else _search(graph, estimate, config)
        graph.prune(plan)
    finally:
        model.train(was_training)
        if config.importance == "taylor":
            model.zero_grad(set_to_none=True)
    _record_widths(model)
    params_after, macs_after = count_params(model), count_macs(model, example)
    return {
        "method": "channels",
        "importance": config.importance,
        "scope": config.scope,
        "ratio": config.ratio,
        "removed": graph.removed(plan),
        "target": dict([config.target]) if config.target else None,
        "params_before": params_before,
        "params_after": params_after,
        "params_reduction": params_before / max(params_after, 1),
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_reduction": macs_before / max(macs_after, 1),
        "classifier": names.get(classifier, ""),
        "skip": list(config.skip),
        "round_to": config.round_to,
        "layers": {names[m]: {"kept": _out_size(m), "of": n} for m, n in widths_before.items()},
    }


def _resolve_skip(model: nn.Module, skip: tuple[str, ...]) -> list[nn.Module]:
    """The modules `skip` names, and every module inside them; an unknown name fails at once."""
    modules = dict(model.named_modules())
    out: list[nn.Module] = []
    for name in skip:
        if name not in modules or name == "":
            layers = [n for n, m in modules.items() if n and (isinstance(m, _PRUNABLE) or list(m.children()))]
            raise KdqError(f"skip names {name!r}, which is no module of {type(model).__name__}{suggest(name, layers)}; "
                           "use names from model.named_modules()")
        out.extend(modules[name].modules())
    return out


def _out_size(module: nn.Module) -> int:
    return int(module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features)


def _trace(model: nn.Module, example: torch.Tensor) -> tuple[dict[nn.Module, int], nn.Module]:
    """Each prunable layer the forward pass runs, with its output positions per sample (a
    convolution's output height x width, summed over calls), and the classifier.

    The classifier is the layer whose output is the model's output (the same storage: a final
    flatten or view counts); failing that, the last prunable layer to run.
    """
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, _, out: calls.append((mod, out)))
             for m in model.modules() if isinstance(m, _PRUNABLE)]
    try:
        with torch.no_grad():
            final = model(example)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise KdqError(f"{type(model).__name__} does not take the example inputs of shape "
                       f"{tuple(example.shape)} ({_first_line(err)}); pass inputs the model takes") from None
    finally:
        for hook in hooks:
            hook.remove()
    if not isinstance(final, torch.Tensor):
        raise KdqError(f"{type(model).__name__} returns {type(final).__name__}; channel pruning needs a model "
                       "that returns one tensor of logits")
    if not calls:
        raise KdqError(f"{type(model).__name__} runs no convolution or linear layer: there are no channels to prune")
    tensors = [(m, out) for m, out in calls if isinstance(out, torch.Tensor)]
    classifier = next((m for m, out in reversed(tensors) if out.data_ptr() == final.data_ptr()), calls[-1][0])
    positions: dict[nn.Module, int] = {}
    for m, out in tensors:  # channels on dim 1 for a convolution, last for a linear layer
        channels = out.shape[1] if isinstance(m, nn.modules.conv._ConvNd) else out.shape[-1]
        positions[m] = positions.get(m, 0) + out.numel() // max(channels, 1)
    return positions, classifier


def _accumulate_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Sum the cross-entropy gradient over `batches` into every weight's .grad (eval mode)."""
    device = device_of(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:  # a frozen layer is still ranked: it needs a gradient too
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    seen = 0
    try:
        for batch in batches:
            try:
                x, y = batch
                loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device), reduction="sum")
            except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as err:
                raise KdqError(f"batches must give (inputs, labels) pairs the model takes ({_first_line(err)})") from None
            loss.backward()
            seen += 1
    finally:
        for p in frozen:
            p.requires_grad_(False)
    if not seen:
        raise KdqError("batches is empty; importance taylor needs at least one (inputs, labels) batch")


def _first_line(err: BaseException) -> str:
    return ((str(err).strip().splitlines() or [type(err).__name__])[0])[:160]


def _importance(name: str) -> tp.importance.Importance:
    # the default per-group "mean" normaliser puts groups on one scale for global ranking
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn":
        return tp.importance.BNScaleImportance()
    # multivariable: |sum over a channel's weights of w x dL/dw|, Molchanov et al.'s per-filter criterion
    return tp.importance.GroupTaylorImportance(multivariable=True)


@dataclass
class _Group:
    """Channels Torch-Pruning says must go together: cut through `root`'s `handler`."""

    root: nn.Module
    handler: Any
    scores: torch.Tensor  # one per unit (a channel, or one channel of each of `repeats` conv groups)
    repeats: int

    def __post_init__(self) -> None:
        self.order = torch.argsort(self.scores, stable=True).tolist()  # weakest first; ties by position

    def indices(self, count: int) -> list[int]:
        """The channel indices of its `count` weakest units (in every conv group of a grouped conv)."""
        units = len(self.scores)
        return sorted(i + r * units for r in range(self.repeats) for i in self.order[:count])


# A plan: how many of its weakest units each group (by position in _Graph.groups) loses. Both
# scopes remove a prefix of each group's ranking, so counts describe a plan completely.
Plan = dict[int, int]


class _Graph:
    """Torch-Pruning's dependency graph of `model` and its groups of coupled channels, scored."""

    def __init__(self, model: nn.Module, example: torch.Tensor, importance: str, ignored: list[nn.Module],
                 round_to: int = 1) -> None:
        try:
            self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        except Exception as err:  # noqa: BLE001 - tracing fails in many ways, all deep inside the library
            raise KdqError(f"Torch-Pruning cannot trace {type(model).__name__} ({_first_line(err)}); "
                           "skip the layers it cannot follow, or prune a zoo model") from None
        scorer = _importance(importance)
        self.groups: list[_Group] = []
        scored_any = False
        for group in self.graph.get_all_groups(ignored_layers=ignored, root_module_types=list(_PRUNABLE)):
            scores = scorer(group)
            if scores is None:  # "bn" on a group without batch norm: it stays whole
                continue
            scored_any = True
            repeats = self._repeats(group)
            scores = torch.nan_to_num(scores.detach().float().cpu().view(repeats, -1).mean(0), nan=0.0)
            if len(scores) > 1:  # a single channel stays
                self.groups.append(_Group(group[0].dep.target.module, group[0].dep.handler, scores, repeats))
        if not scored_any and importance == "bn":
            raise KdqError(f"importance bn ranks channels by batch-norm scales and {type(model).__name__} has no "
                           "batch norm after a prunable layer; use l1 or l2")
        self._cuts: dict[tuple[int, int], list[tuple[nn.Module, bool, int]]] = {}
        self._ranked: list[int] | None = None
        self.round_to = round_to

    def _repeats(self, group: Any) -> int:
        """How many conv groups a grouped convolution in `group` splits its channels into (1: none).

        A depthwise convolution keeps one channel per group whatever the width, so it does not count.
        """
        counts = [1]
        for dep, _ in group:
            m = dep.target.module
            if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups != m.out_channels:
                counts.append(m.groups)
        return max(counts)

    def rounded(self, plan: Plan) -> Plan:
        """`plan` with every group's kept width rounded up to a multiple of `round_to` (at most its own)."""
        if self.round_to == 1:
            return dict(plan)
        out = {}
        for gi, count in plan.items():
            g = self.groups[gi]
            step = self.round_to // math.gcd(self.round_to, g.repeats)  # units: a unit is `repeats` channels
            units = len(g.scores)
            out[gi] = units - min(units, -(-(units - count) // step) * step)
        return out

    def plan(self, ratio: float, scope: str) -> Plan:
        """How many units each group loses at `ratio`; every group keeps at least one (rounded)."""
        return self.rounded(self._plan(ratio, scope))

    def _plan(self, ratio: float, scope: str) -> Plan:
        if scope == "layer":  # 1e-9: 0.29 x 100 is 28.999...
            return {gi: min(math.floor(len(g.scores) * ratio + 1e-9), len(g.scores) - 1)
                    for gi, g in enumerate(self.groups)}
        if self._ranked is None:  # every unit of every group, weakest first (ties: by group, then rank)
            self._ranked = [gi for _, gi, _ in sorted((float(score), gi, rank) for gi, g in enumerate(self.groups)
                                                      for rank, score in enumerate(g.scores[g.order]))]
        plan = {gi: 0 for gi in range(len(self.groups))}
        wanted = math.floor(len(self._ranked) * ratio + 1e-9)
        taken = 0
        for gi in self._ranked:  # a group's units come in its own order, weakest first
            if taken == wanted:
                break
            if plan[gi] < len(self.groups[gi].scores) - 1:  # its last unit stays: the next weakest goes instead
                plan[gi] += 1
                taken += 1
        return plan

    def removed(self, plan: Plan) -> float:
        """The fraction of the prunable groups' channels `plan` removes."""
        total = sum(len(g.scores) for g in self.groups)
        return sum(plan.values()) / total if total else 0.0

    def cuts(self, plan: Plan) -> tuple[dict[nn.Module, int], dict[nn.Module, int]]:
        """How many output and input channels each module loses under `plan`, without cutting.

        Groups touch disjoint channels, so a plan's cuts are the sum of its groups' (cached).
        """
        out_cut: dict[nn.Module, int] = {}
        in_cut: dict[nn.Module, int] = {}
        for gi, count in plan.items():
            if count and (gi, count) not in self._cuts:
                g = self.groups[gi]
                self._cuts[gi, count] = [
                    (dep.target.module, self.graph.is_out_channel_pruning_fn(dep.handler), len(set(idxs)))
                    for dep, idxs in self.graph.get_pruning_group(g.root, g.handler, g.indices(count))]
            for module, is_out, n in self._cuts.get((gi, count), []):
                cut = out_cut if is_out else in_cut
                cut[module] = cut.get(module, 0) + n
        return out_cut, in_cut

    def prune(self, plan: Plan) -> None:
        """Cut the tensors. Each group's indices refer to channels no other group touches."""
        for gi, count in plan.items():
            if count:
                g = self.groups[gi]
                group = self.graph.get_pruning_group(g.root, g.handler, g.indices(count))
                if self.graph.check_pruning_group(group):
                    group.prune()


class _Estimate:
    """Parameters and MACs of the model after a plan, from layer sizes alone (nothing is cut).

    A convolution runs (output positions) x out x in/groups x kernel-area MACs and holds as
    many weights, a linear layer (positions) x out x in: what PyTorch's flop counter counts.
    Positions do not change with width, so one traced pass measures them; a batch norm holds
    two parameters per channel.
    """

    def __init__(self, positions: dict[nn.Module, int], params: int, macs: int) -> None:
        self.positions, self.base = positions, {"params": params, "macs": macs}

    def __call__(self, cuts: tuple[dict[nn.Module, int], dict[nn.Module, int]]) -> dict[str, int]:
        out_cut, in_cut = cuts
        params, macs = self.base["params"], self.base["macs"]
        for m in set(out_cut) | set(in_cut):
            out, inp = out_cut.get(m, 0), in_cut.get(m, 0)
            if isinstance(m, _PRUNABLE):
                lost = _weights(m, 0, 0) - _weights(m, out, inp)
                params -= lost + (out if m.bias is not None else 0)
                macs -= self.positions.get(m, 0) * lost
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                params -= 2 * out
        return {"params": params, "macs": macs}


def _weights(m: nn.Module, out_cut: int, in_cut: int) -> int:
    """Weights of conv or linear layer `m` once it loses `out_cut` outputs and `in_cut` inputs."""
    if isinstance(m, nn.Linear):
        return (m.out_features - out_cut) * (m.in_features - in_cut)
    if m.groups > 1 and m.groups == m.in_channels == m.out_channels:  # depthwise: stays depthwise
        return (m.out_channels - max(out_cut, in_cut)) * math.prod(m.kernel_size)
    return (m.out_channels - out_cut) * (m.in_channels - in_cut) // m.groups * math.prod(m.kernel_size)


def _search(graph: _Graph, estimate: _Estimate, config: Channels) -> Plan:
    """The plan that comes closest to the MACs or parameter reduction `config` asks for.

    The estimate falls as the ratio grows: bisect for the ratio where it crosses the goal.
    Between the two sides of the crossing, the groups that differ lose their extra units one
    at a time, weakest first, and the plan nearest the goal (on a log scale) wins: with one
    ratio for every layer, the steps of small layers (1/16 of a 16-channel layer) would
    otherwise leave a ResNet-56 at 1.9x for a 2x target.
    """
    key, factor = config.target  # type: ignore[misc]
    base = estimate.base[key]
    goal = base / factor

    def value(plan: Plan) -> int:
        return estimate(graph.cuts(plan))[key]

    lo, hi = 0.0, 1.0 - 1e-12
    plan_lo, plan_hi = graph.plan(lo, config.scope), graph.plan(hi, config.scope)
    if value(plan_hi) > goal:
        what = "MACs" if key == "macs" else "parameters"
        at_hi = value(plan_hi)
        raise KdqError(f"{factor:g}x fewer {what} is out of reach: with the fewest channels left in every prunable "
                       f"layer (one, or round_to) the model keeps {at_hi:,} of {base:,} {what} ({base / max(at_hi, 1):.2f}x fewer); ask for at most "
                       "that, or skip fewer layers")
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        plan = graph.plan(mid, config.scope)
        if value(plan) > goal:
            lo, plan_lo = mid, plan
        else:
            hi, plan_hi = mid, plan
    extra = sorted((float(graph.groups[gi].scores[graph.groups[gi].order[k]]), gi)
                   for gi, count in plan_hi.items() for k in range(plan_lo[gi], count))
    def distance(plan: Plan) -> float:
        return abs(math.log(max(value(plan), 1) / goal))

    best, plan = plan_lo, dict(plan_lo)
    best_distance = distance(best)
    for _, gi in extra:
        plan[gi] += 1
        candidate = graph.rounded(plan)
        if distance(candidate) < best_distance:
            best, best_distance = candidate, distance(candidate)
    return best


def _record_widths(model: nn.Module) -> None:
    """A zoo model's new layer sizes into its kdq_spec, so `create_model(**model.kdq_spec)` rebuilds it."""
    spec = getattr(model, "kdq_spec", None)
    if not isinstance(spec, dict) or not spec.get("name"):
        return  # a user's module: pruned, but only the user can rebuild it
    base = {k: v for k, v in spec.items() if k != "widths"}
    with torch.device("meta"):  # the unpruned reference: shapes only, nothing allocated
        reference = create_model(**base)
    widths = read_widths(model, reference)
    model.kdq_spec = {**base, "widths": widths} if widths else base
