"""The typed, self-validating set of training hyperparameters."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

from kdq.engine.device import resolve_device
from kdq.engine.tracking import INSTALL
from kdq.errors import KdqError, suggest

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
LOGGERS = ("none", "tensorboard")  # where a run's curves go besides metrics.jsonl (kdq.engine.tracking)
# The loop seeds each epoch's generator with seed * 1_000_003 + epoch, which must stay below
# torch's 2**64 limit; NumPy takes seeds below 2**32.
SEED_MAX = 2**32 - 1
# Defaults of the commands that fine-tune a trained model rather than train from scratch
# (kdq qat for int8; kdq qat --bits and kdq recipe for low-bit). Why each value:
# - epochs 3: the weights start trained; a few epochs let them adapt to the quantization grid at
#   a small fraction of the cost of training (in BENCHMARKS.md's sweep, one epoch at lr 0.01
#   already lands within 0.3 points of float at w8a8).
# - warmup_epochs 0: warm-up protects freshly initialised weights and BN statistics from a high lr;
#   fine-tuning starts from trained ones, and half an epoch would be a sixth of a 3-epoch run.
# - lr: far below train's 0.05 peak, so the trained weights are refined, not relearned.
QAT_DEFAULTS: dict[str, Any] = {
    "epochs": 3,
    # int8 fake quantization moves each weight by at most half a step of a 255-level grid, so
    # only a small correction is needed: half the low-bit lr
    "lr": 0.005,
    "warmup_epochs": 0.0,
}
FINE_TUNE_DEFAULTS: dict[str, Any] = {
    "epochs": 3,
    # at 4 bits and below a latent weight must cross a whole quantization step to change its
    # code, and LSQ learns the step sizes too: twice int8's lr
    "lr": 0.01,
    "warmup_epochs": 0.0,
}
PRUNE_DEFAULTS: dict[str, Any] = {
    "epochs": 3,
    # the surviving weights are already trained: a fifth of training's lr lets them take over
    # from the pruned ones without forgetting what they know (lr rewinding restarts higher)
    "lr": 0.01,
    "warmup_epochs": 0.0,
}
# Each of qkd's three phases, unless epochs or the phase's own options say otherwise: three
# phases of one epoch cost what one default fine-tuning run (3 epochs) costs.
QKD_PHASE_EPOCHS = 1
_FINITE = ("lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "mixup", "cutmix")


@dataclass
class TrainConfig:
    """Everything that shapes one training run. Invalid values fail here, before any work."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # SGD with Nesterov momentum: the strong default for small convnets
    lr: float = 0.05  # peak learning rate, reached after warm-up
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.5  # a short linear ramp keeps BN statistics sane at high lr
    label_smoothing: float = 0.0
    augment: bool = True  # random crop / flip where the data set allows it
    mixup: float = 0.0  # Beta(alpha, alpha) parameter; 0 turns it off
    cutmix: float = 0.0
    patience: int | None = None  # early stopping after this many epochs without a better val accuracy
    keep_epoch: int | None = None  # keep the weights after this epoch (0: the initial ones) for weight rewinding
    seed: int = 0
    deterministic: bool = False
    amp: bool = True  # mixed precision, used only on CUDA
    device: str = "auto"
    eval_batch_size: int = 512
    progress: bool = True
    log: str = "none"  # "tensorboard": event files in the run directory, for `tensorboard --logdir`
    log_every: int | None = None  # with a logger: also the batch loss every this many steps
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, f.type, getattr(self, f.name))
        for name in _FINITE:  # inf and nan pass the range checks below (or train to nan)
            _check(_is_finite(getattr(self, name)), f"{name} must be a finite number, got {getattr(self, name)}")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        _check(0 <= self.seed <= SEED_MAX, f"seed must be an integer from 0 to {SEED_MAX}, got {self.seed}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0 (0 turns them off)")
        _check(self.patience is None or self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        _check(self.keep_epoch is None or 0 <= self.keep_epoch <= self.epochs,
               f"keep_epoch must be from 0 (the initial weights) to epochs ({self.epochs}), got {self.keep_epoch}")
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check(self.log in LOGGERS, f"log must be one of {', '.join(LOGGERS)}, got {self.log!r}")
        _check(self.log_every is None or self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        _check(self.log_every is None or self.log != "none", "log_every needs a logger; add log: tensorboard (--log tensorboard)")
        # a missing package fails here, before any work, not after the first epoch
        _check(self.log != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
               f"log: tensorboard needs the tensorboard package; install it with: {INSTALL}")
        resolve_device(self.device)  # an unknown or absent device fails here, before any work

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from plain data (YAML, CLI), rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for key in values:
            if key not in known:
                raise KdqError(f"unknown training option {key!r}{suggest(key, known)}; options: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out


# The training options by name: YAML keys, CLI flags and a stage's **options.
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "extra")
# The `train:` defaults of an experiment that its fine-tuning stages (qat, prune, recipe) take;
# they keep their own gentle defaults for the rest (epochs, lr, warm-up: QAT_DEFAULTS above).
RUN_CONTROL_KEYS = ("batch_size", "device", "progress", "amp", "seed", "log", "log_every")
# Run controls that change how a run is watched, not what it computes (a progress bar, TensorBoard).
WATCHING_KEYS = ("progress", "log", "log_every")


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_type(name: str, annotation: str, value: Any) -> None:
    """YAML and the CLI hand us loosely typed values; reject a wrong type by name."""
    base, _, optional = annotation.partition(" | ")
    if base not in _TYPES or (optional == "None" and value is None):
        return
    ok = isinstance(value, _TYPES[base]) and (base == "bool" or not isinstance(value, bool))
    _check(ok, f"{name} must be {_TYPE_WORDS[base]}, got {value!r}")


def _is_finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise KdqError(message)
