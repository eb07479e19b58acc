"""Distillation as a training objective: a frozen teacher, the methods' weighted terms, and CE.

    losses = method_losses({"kd": 1.0, "at": 1000}, temperature=4)
    objective = Distiller(teacher, losses, "online")      # kdq.engine.fit(..., objective=objective)

Methods that read intermediate features tap the student and the teacher by module name
(`features`: (student layer, teacher layer) pairs, by default the models' feature_layers(),
deepest stages paired when their counts differ); the names are resolved in `prepare`, before
any training, and an unknown one fails there with the valid names. Their adapters are built
there too, from the shapes one two-sample forward pass gives, and are the objective's
trainable parts: optimised, checkpointed and restored, never part of the saved student.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdq.data import Split
from kdq.distill.hooks import FeatureTaps
from kdq.distill.methods import LOSSES, DistillLoss, is_number
from kdq.distill.teacher import TEACHER_MODES, Ensemble, freeze, unwrap
from kdq.engine.evaluate import predict
from kdq.engine.objectives import Objective
from kdq.errors import KdqError, short_repr, suggest

Method = str | Mapping[str, Any]  # "dkd", or {"kd": 1.0, "at": 1000}, or {"dkd": {"weight": 1, "beta": 8}}


def method_losses(method: Method | DistillLoss = "kd", *, temperature: float | None = None, alpha: float | None = None,
                  label_smoothing: float = 0.0) -> dict[str, tuple[DistillLoss, float]]:
    """{name: (loss module, weight)} for a method name, a weighted mapping of names, or a loss.

    A name alone takes the method's default weight; a mapping gives each method its weight, or a
    mapping of its options with an optional `weight`. `temperature`, `alpha` and
    `label_smoothing` go to every method that takes them (the CLI's --temperature, --alpha).
    """
    if isinstance(method, DistillLoss):
        return {method.name or "kd": (method, 1.0)}
    spec = {method: None} if isinstance(method, str) else method
    if not isinstance(spec, Mapping) or not spec:
        raise KdqError(f"method must be a method name or a mapping of names to weights, got {short_repr(method)}; "
                       "see `kdq methods`")
    shared = {"temperature": temperature, "alpha": alpha, "label_smoothing": label_smoothing or None}
    losses: dict[str, tuple[DistillLoss, float]] = {}
    for name, value in spec.items():
        cls = LOSSES.get(str(name))
        options = dict(value) if isinstance(value, Mapping) else {}
        weight = options.pop("weight", value if is_number(value) else cls.default_weight)
        if value is not None and not isinstance(value, Mapping) and not is_number(value):
            raise KdqError(f"method {name!r}: give a weight or a mapping of options, got {short_repr(value)}")
        if not (is_number(weight) and 0 <= weight < math.inf):
            raise KdqError(f"method {name!r}: weight must be a finite number >= 0, got {short_repr(weight)}")
        takes = inspect.signature(cls).parameters
        for key, given in shared.items():
            if given is not None and key in takes and key in cls.shares:
                options.setdefault(key, given)
        unknown = [k for k in options if k not in takes]
        if unknown:
            own = [k for k in takes if k not in ("self", "args", "kwargs")]
            raise KdqError(f"method {name!r} has no option {unknown[0]!r}{suggest(unknown[0], own)}; "
                           f"its options: {', '.join(own) or 'none'}")
        losses[str(name)] = (cls(**options), float(weight))
    if all(w == 0 for _, w in losses.values()):
        raise KdqError("every method's weight is 0: nothing would be distilled; give at least one weight > 0")
    return losses


def method_spec(items: Sequence[str] | None, options: Sequence[str] = ()) -> Method | None:
    """The CLI's --method NAME[=WEIGHT] (repeatable) and --method-option NAME.KEY=VALUE as a method."""
    from kdq.io import parse_yaml

    if not items:
        if options:
            raise KdqError("--method-option needs --method, e.g. --method dkd --method-option dkd.beta=8")
        return None
    spec: dict[str, Any] = {}
    for item in items:
        name, sep, weight = item.partition("=")
        if name in spec:
            raise KdqError(f"--method {name} is given twice; give each method once")
        value = parse_yaml(weight, f"--method {short_repr(name)}", "write e.g. at=1000") if sep else None
        spec[name] = {} if value is None else {"weight": value}
    for item in options:
        key, sep, text = item.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise KdqError(f"--method-option {short_repr(item)} must look like METHOD.OPTION=VALUE, e.g. dkd.beta=8")
        if name not in spec:
            raise KdqError(f"--method-option {short_repr(item)} names method {name!r}, which no --method gives")
        spec[name][option] = parse_yaml(text, f"--method-option {short_repr(key)}", "write e.g. dkd.beta=8")
    if len(spec) == 1 and not next(iter(spec.values())):
        return next(iter(spec))
    return spec


def labeled_mask(targets: torch.Tensor, count: int, num_classes: int, seed: int) -> torch.Tensor:
    """Which training rows keep their label when only `count` do (--labeled): a boolean mask.

    A permutation seeded by `seed` (the run's seed) orders the rows; they are taken class by
    class in turn (each class's first row in that order, then each one's second, ...), so the
    labeled rows are as balanced over the classes as their counts allow and every class has
    one. `kdq train --labeled` and `kdq distill --labeled` with the same seed choose the same rows.
    """
    n = len(targets)
    if not is_number(count) or isinstance(count, float) or not num_classes <= count <= n:
        raise KdqError(f"labeled (--labeled) must be an integer from {num_classes} (one image per class) to {n} "
                       f"(the training set's size), got {short_repr(count)}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    y = targets.cpu()[order]
    turn = torch.zeros(n, dtype=torch.long)  # how many rows of the same class come earlier in `order`
    for c in range(num_classes):
        rows = (y == c).nonzero().flatten()
        turn[rows] = torch.arange(len(rows))
    chosen = order[torch.sort(turn, stable=True).indices[:count]]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return mask


def ce_weight(loss: DistillLoss) -> float:
    """The coefficient of the `ce` term inside a method's `loss` (includes_ce methods).

    A method states it as `ce_weight`; else a method that shares `alpha` (kd: alpha weighs
    the soft term against CE, see DistillLoss.shares) weighs CE by 1 - alpha; else 1 (dkd, dist).
    """
    stated = getattr(loss, "ce_weight", None)
    if stated is not None:
        return float(stated)
    return 1.0 - float(loss.alpha) if "alpha" in loss.shares else 1.0


def method_record(key: str, method: Method | DistillLoss, losses: Mapping[str, tuple[DistillLoss, float]],
                  pairs: Sequence[tuple[str, str]] | None = None) -> dict[str, Any]:
    """What config.yaml adds for the methods: {key: {name: weight}} and the layer pairs, each
    only when other than Hinton KD on default layers, so runs made before methods existed
    still resume with the same record."""
    record: dict[str, Any] = {key: {name: w for name, (_, w) in losses.items()}} if method != "kd" else {}
    if pairs:
        record["features"] = [f"{s}={t}" for s, t in pairs]
    return record


class Distiller(Objective):
    """The student's logits (and tapped features) scored against a frozen teacher's.

    online: the teacher sees the same augmented batch as the student (default).
    cached: teacher logits are computed once over the un-augmented training set and looked
    up by sample index; far cheaper for an expensive teacher, at the price of soft targets
    that ignore the augmentation; logit methods only.
    The frozen teacher is held, not a part. `loss` is a DistillLoss (KDLoss) or the
    {name: (loss, weight)} of `method_losses`. The total is the weighted sum of the methods'
    `loss`, plus cross-entropy on the labels when no method includes it.

    `labeled` (a boolean mask over the training rows, see labeled_mask) hides the labels of
    the other rows: they are scored by the distillation terms only. Every cross-entropy, the
    objective's own and the one a method includes (its `ce` term, replaced with the same
    coefficient, see ce_weight), is the mean over the batch's labeled rows (0 when it has
    none). A method that reads a target class beyond its CE (dkd) gets the teacher's top
    class for a hidden row: the teacher labels the data that has no labels.

    `hint_epochs=N` is FitNets' two-stage schedule (Romero et al. 2015): for the first N epochs
    only the feature-family methods (fitnet, at: the hints) are minimised, with no
    cross-entropy; from epoch N+1 only the other methods and the cross-entropy. The layers
    past the hinted ones get zero gradients in the hint epochs (their weight decay still
    applies), which keeps every parameter in the graph, as DistributedDataParallel requires.
    """

    def __init__(self, teacher: nn.Module, loss: DistillLoss | Mapping[str, tuple[DistillLoss, float]],
                 mode: str = "online", batch_size: int = 512, *,
                 features: Sequence[tuple[str, str]] | None = None, label_smoothing: float = 0.0,
                 labeled: torch.Tensor | None = None, hint_epochs: int = 0) -> None:
        super().__init__()
        if mode not in TEACHER_MODES:
            raise KdqError(f"teacher mode must be one of {', '.join(TEACHER_MODES)}, got {mode!r}")
        chosen = method_losses(loss) if isinstance(loss, DistillLoss) else dict(loss)
        self.hold("teacher", freeze(teacher))
        self.losses = nn.ModuleDict({name: l for name, (l, _) in chosen.items()})
        self.weights = {name: w for name, (_, w) in chosen.items()}
        self.reads = {l.reads for l in self.losses.values()}
        if mode == "cached" and self.reads != {"logits"}:
            taps = sorted(n for n, l in self.losses.items() if l.reads != "logits")
            raise KdqError(f"{', '.join(taps)} read the teacher's {' and '.join(sorted(self.reads - {'logits'}))}, "
                           "which a cached teacher does not keep; use teacher_mode online (--teacher-mode online)")
        if isinstance(teacher, Ensemble) and self.reads != {"logits"}:
            taps = sorted(n for n, l in self.losses.items() if l.reads != "logits")
            raise KdqError(f"{', '.join(taps)} read one teacher's {' and '.join(sorted(self.reads - {'logits'}))}, "
                           f"but {len(teacher.members)} teachers have no single set of layers; "
                           "use logit methods (kd, dkd, dist) with several teachers, or one teacher")
        if labeled is not None and (labeled.dtype != torch.bool or labeled.dim() != 1):
            raise KdqError("labeled must be a boolean mask over the training rows (kdq.distill.labeled_mask)")
        self.labeled = labeled
        self.hints = hint_names(self.losses, hint_epochs)
        self.hint_epochs, self.in_hints = hint_epochs, False
        self.mode, self.batch_size, self.pairs = mode, batch_size, list(features) if features else None
        self.label_smoothing = label_smoothing
        self.cache: torch.Tensor | None = None
        self.student_taps = self.teacher_taps = self.student_fc = self.teacher_fc = None

    def prepare(self, model: nn.Module, train: Split, device: torch.device) -> None:
        self.teacher.to(device)
        if self.reads != {"logits"}:
            self._tap(unwrap(model), unwrap(self.teacher))
            self._setup(model, train, device)
        super().prepare(model, train, device)  # parts (adapters) to the device
        if self.labeled is not None:
            if len(self.labeled) != len(train):
                raise KdqError(f"the labeled mask covers {len(self.labeled)} rows but the training set has {len(train)}")
            self.labeled = self.labeled.to(device)
        if self.mode == "cached":
            self.cache = predict(self.teacher, train.x, self.batch_size).to(device)

    def _tap(self, student: nn.Module, teacher: nn.Module) -> None:
        if "features" in self.reads:
            pairs = self.pairs or _default_pairs(student, teacher)
            self.pairs = pairs
            self.student_taps = FeatureTaps(student, [s for s, _ in pairs])
            self.teacher_taps = FeatureTaps(teacher, [t for _, t in pairs])
        if "embedding" in self.reads:
            for who, net in (("student", student), ("teacher", teacher)):
                if not isinstance(getattr(net, "fc", None), nn.Linear):
                    raise KdqError(f"the {who} ({type(net).__name__}) has no final nn.Linear named fc, whose input "
                                   "embedding methods (rkd, pkt, crd) read; use a zoo model or name its classifier fc")
            self.student_fc = FeatureTaps(student, ["fc"], inputs=True)
            self.teacher_fc = FeatureTaps(teacher, ["fc"], inputs=True)

    def _setup(self, model: nn.Module, train: Split, device: torch.device) -> None:
        """One two-sample pass through both models gives the shapes the methods build their parts for."""
        x = train.x[:2].to(device)
        was_training = model.training
        model.eval()  # no batch-norm statistics move
        with torch.no_grad():
            model(x)
            self.teacher(x)
        model.train(was_training)
        for name, loss in self.losses.items():
            if loss.reads == "logits":
                continue
            student, teacher = self._read(loss.reads)
            shapes = (lambda f: [tuple(t.shape[1:]) for t in f]) if loss.reads == "features" else (lambda f: tuple(f.shape[1:]))
            try:
                loss.setup(shapes(student), shapes(teacher), len(train))
            except KdqError as exc:
                pairs = ", ".join(f"{s}={t}" for s, t in self.pairs or [])
                where = f" on the feature pairs {pairs}" if loss.reads == "features" else ""
                raise KdqError(f"{name}{where}: {exc}") from None

    def start_epoch(self, epoch: int) -> None:
        self.in_hints = epoch < self.hint_epochs

    def release(self) -> None:
        """Take the feature taps off both models (fit calls this when training ends)."""
        for taps in (self.student_taps, self.teacher_taps, self.student_fc, self.teacher_fc):
            if taps is not None:
                taps.remove()
        self.student_taps = self.teacher_taps = self.student_fc = self.teacher_fc = None

    def _read(self, reads: str) -> tuple[Any, Any]:
        if reads == "features":
            return ([self.student_taps.features[s] for s, _ in self.pairs],
                    [self.teacher_taps.features[t] for _, t in self.pairs])
        return (torch.flatten(self.student_fc.features["fc"], 1), torch.flatten(self.teacher_fc.features["fc"], 1))

    def teacher_logits(self, inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[indices]
        self.teacher.eval()  # stays frozen even if a caller flipped it to train mode
        with torch.no_grad():
            return self.teacher(inputs)

    def forward(self, logits, targets, inputs, indices):  # noqa: ANN001 - see kdq.engine.objectives
        teacher = self.teacher_logits(inputs, indices)
        known = None if self.labeled is None else self.labeled[indices]
        if known is not None and targets.dim() != 1:
            raise KdqError("labeled needs class-index targets, not the mixed targets of mixup/cutmix; turn those off")
        if known is not None:  # hidden labels are never read: the teacher's top class stands in
            targets = torch.where(known, targets, teacher.argmax(1))
        total: Any = 0
        outs = {}
        for name, loss in self.losses.items():
            if self.hint_epochs and (name in self.hints) != self.in_hints:
                continue  # the other stage's term
            student_in, teacher_in = (logits, teacher) if loss.reads == "logits" else self._read(loss.reads)
            outs[name] = out = loss(student_in, teacher_in, targets, indices)
            if known is not None and loss.includes_ce:  # its CE over the labeled rows only
                if "ce" not in out:
                    raise KdqError(f"{name} includes cross-entropy but returns no 'ce' term, so labeled cannot hide it")
                c, ce = ce_weight(loss), self._labeled_ce(logits, targets, known, getattr(loss, "label_smoothing", None))
                outs[name] = out = {**out, "loss": out["loss"] - c * out["ce"] + c * ce, "ce": ce}
            total = total + self.weights[name] * out["loss"]
        # a term two methods both name (ce) is kept once per method, prefixed with the method's name
        names = [k for out in outs.values() for k in out if k != "loss"]
        terms = {(f"{name}_{k}" if names.count(k) > 1 else k): v
                 for name, out in outs.items() for k, v in out.items() if k != "loss"}
        if self.in_hints:
            return {"loss": total + 0.0 * logits.float().sum(), **terms}
        if not any(l.includes_ce for l in self.losses.values()):
            ce = (F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing) if known is None
                  else self._labeled_ce(logits, targets, known, None))
            total, terms["ce"] = total + ce, ce
        return {"loss": total, **terms}

    def _labeled_ce(self, logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor,
                    label_smoothing: float | None) -> torch.Tensor:
        """Mean cross-entropy over the `known` rows (0 when none); no host sync, no hidden label read."""
        ls = self.label_smoothing if label_smoothing is None else label_smoothing
        rows = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=ls)
        return (rows * known).sum() / known.sum().clamp(min=1)


def hint_names(losses: Mapping[str, DistillLoss], hint_epochs: Any) -> set[str]:
    """The methods FitNets' hint stage trains (the feature family); checks `hint_epochs`."""
    if not (isinstance(hint_epochs, int) and not isinstance(hint_epochs, bool) and hint_epochs >= 0):
        raise KdqError(f"hint_epochs must be a whole number >= 0, got {short_repr(hint_epochs)}")
    hints = {name for name, loss in losses.items() if loss.family == "feature"}
    if hint_epochs and not hints:
        raise KdqError("hint_epochs trains feature methods first, but none is given; "
                       "add one, e.g. --method fitnet --method kd")
    if hint_epochs and len(hints) == len(losses):
        raise KdqError("hint_epochs needs a method for the epochs after the hints; "
                       "add one, e.g. --method fitnet --method kd")
    return hints


def _default_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """Each model's feature_layers(), deepest stages paired when their counts differ."""
    names = []
    for who, net in (("student", student), ("teacher", teacher)):
        layers = getattr(net, "feature_layers", None)
        if not callable(layers):
            raise KdqError(f"the {who} ({type(net).__name__}) names no feature layers (feature_layers()); "
                           "pair layers yourself with --feature STUDENT_LAYER=TEACHER_LAYER")
        names.append(list(layers()))
    k = min(len(names[0]), len(names[1]))
    if k == 0:
        raise KdqError("a model gives no feature layers to pair; pair them with --feature STUDENT_LAYER=TEACHER_LAYER")
    return list(zip(names[0][-k:], names[1][-k:]))


def parse_features(items: Sequence[Any] | None) -> list[tuple[str, str]] | None:
    """--feature STUDENT_LAYER=TEACHER_LAYER items (or (student, teacher) pairs) as pairs."""
    pairs = []
    for item in items or []:
        if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(n, str) for n in item):
            pairs.append((item[0], item[1]))
            continue
        student, sep, teacher = str(item).partition("=")
        if not sep or not student or not teacher:
            raise KdqError(f"--feature {short_repr(item)} must look like STUDENT_LAYER=TEACHER_LAYER, e.g. layer3=layer3")
        pairs.append((student, teacher))
    return pairs or None
