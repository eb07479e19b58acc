"""QKD (Kim et al. 2019), per scheme, in three phases.

- self-studying: the quantized student alone;
- co-studying: teacher and student trained together, each distilled from the other, so the
  teacher becomes quantization-friendly (the teacher is the objective's trainable part);
- tutoring: teacher frozen, student distilled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from kdq.data import DataBundle
from kdq.distill import Distiller, KDLoss, method_losses, method_record
from kdq.distill.objective import Method
from kdq.engine import count_params, distributed, fit
from kdq.engine.config import QKD_PHASE_EPOCHS, TRAIN_KEYS
from kdq.engine.objectives import Objective, parts_of
from kdq.errors import KdqError, suggest
from kdq.io import load_weights, write_json
from kdq.quant.lowbit import quantize_lowbit
from kdq.recipes.common import CHECKS, RECIPES, announce, each_scheme, finished
from kdq.rundir.claim import claim
from kdq.rundir.layout import BEST, BEST_OBJECTIVE, PHASE_FILE
from kdq.rundir.load import load_teacher
from kdq.stages.lowbit import fine_tune_config, lowbit_config, lowbit_source, run_record, train_lowbit

PHASES = ("self_studying", "co_studying", "tutoring")


class MutualKD(Objective):
    """Co-studying's objective: the student is distilled from the teacher's (detached) logits and
    the teacher from the student's. The teacher is this objective's trainable part, so the
    optimizer, the checkpoint and the best epoch's weights (best_objective.safetensors) cover it."""

    def __init__(self, teacher: nn.Module, loss: KDLoss) -> None:
        super().__init__()
        self.teacher, self.loss = teacher, loss

    def forward(self, logits, targets, inputs, indices):  # noqa: ANN001 - see kdq.engine.objectives
        teacher = self.teacher(inputs)
        student = self.loss(logits, teacher.detach(), targets)
        taught = self.loss(teacher, logits.detach(), targets)
        return {"loss": student["loss"] + taught["loss"], "kd": student["kd"], "ce": student["ce"],
                "teacher_loss": taught["loss"]}


def _phase(model: nn.Module, out: Path, data: DataBundle, cfg, objective, resume: bool) -> None:  # noqa: ANN001
    """One intermediate QKD phase into `out`; a finished one is reloaded when resuming, the
    objective's parts (co-studying's teacher) included."""
    done = resume and (out / PHASE_FILE).exists()
    announce(f"  phase {out.name} ({PHASES.index(out.name) + 1}/{len(PHASES)}){': finished, reloaded' if done else ''}")
    if done:
        weights = load_weights(out / BEST)
        if any(k.startswith("student.") for k in weights):  # kdq before objectives had parts: one pair module
            objective.load_state_dict({k: v for k, v in weights.items() if k.startswith("teacher.")})
            weights = {k.removeprefix("student."): v for k, v in weights.items() if k.startswith("student.")}
        elif parts_of(objective) is not None:
            objective.load_state_dict(load_weights(out / BEST_OBJECTIVE))
        model.load_state_dict(weights)
        return
    result = fit(model, data, cfg, out, objective=objective, resume=resume)
    if distributed.is_primary():  # under torchrun every rank holds the phase's best state in memory already
        write_json(out / PHASE_FILE, {"train": cfg.to_dict(), "best_epoch": result.best_epoch,
                                      "best_val_accuracy": result.best_val_accuracy})


@RECIPES.register("qkd")
def qkd(source: str | Path, out: str | Path, *, bits: str | Sequence[str], teacher: str | Path | None = None,
        phases: dict[str, dict[str, Any]] | None = None, distill_method: Method = "kd",
        temperature: float = 4.0, alpha: float = 0.7,
        quantizer: str = "lsq", act_quantizer: str | None = None, first_last_bits: int | None = 8,
        data: str | DataBundle | None = None, resume: bool = False, **train: Any) -> dict[str, dict[str, Any]]:
    """QKD per scheme. `phases` maps self_studying / co_studying / tutoring to their own training
    options over `train` (default one epoch each); co-studying trains the teacher at the same lr.
    The phases run in out/<scheme>/self_studying and co_studying; tutoring writes out/<scheme>.
    Co-studying is mutual Hinton KD, as in the paper; tutoring distils with `distill_method`."""
    phases = phases or {}
    teacher = teacher or source
    results = {}
    for scheme in each_scheme("qkd", bits, train.get("seed", 0)):
        run_dir = Path(out) / scheme
        done = finished(run_dir, resume)
        if done is None:
            started = time.perf_counter()  # train_time_s covers all three phases
            cfg = {p: fine_tune_config({"epochs": QKD_PHASE_EPOCHS, **train, **(phases.get(p) or {})}) for p in PHASES}
            config = lowbit_config(scheme, quantizer, act_quantizer, first_last_bits)
            model, meta, bundle = lowbit_source(source, data)
            student = quantize_lowbit(model, config)
            loss = KDLoss(temperature, alpha)
            teacher_net = load_teacher(teacher, bundle)
            taught = method_losses(distill_method, temperature=temperature, alpha=alpha)
            record = {"command": "recipe", "recipe": "qkd", "source": str(source), "teacher": str(teacher),
                      "bits": scheme, "lowbit": config.to_dict(), "temperature": temperature, "alpha": alpha,
                      "phases": {p: c.to_dict() for p, c in cfg.items()},
                      **method_record("distill_method", distill_method, taught)}
            # the phases write inside the scheme's run directory: claim it before the first
            claimed = claim(run_dir, "lowbit", "recipe", resume=resume, record=run_record(record, cfg["tutoring"], bundle))
            with distributed.primary_only(claimed, run_dir):
                _phase(student, run_dir / "self_studying", bundle, cfg["self_studying"], None, resume)
                mutual = MutualKD(teacher_net, loss)
                _phase(student, run_dir / "co_studying", bundle, cfg["co_studying"], mutual, resume)
                tutor = Distiller(mutual.teacher, taught, "online", cfg["tutoring"].eval_batch_size)
                announce(f"  phase tutoring ({len(PHASES)}/{len(PHASES)})")
                done = train_lowbit(student, run_dir, bundle, meta, cfg["tutoring"], record, objective=tutor,
                                    resume=resume, float_params=count_params(model), started=started)
        results[scheme] = {**done, "run_dir": str(run_dir)}
    return results


def _check_phases(options: dict[str, Any]) -> None:
    """`phases` maps phase names to training options."""
    phases = options.get("phases") or {}
    if not isinstance(phases, dict):
        raise KdqError(f"phases must be a mapping of {', '.join(PHASES)} to training options, got {phases!r}")
    train = {k: v for k, v in options.items() if k in TRAIN_KEYS}
    for phase, values in phases.items():
        if phase not in PHASES:
            raise KdqError(f"unknown qkd phase {phase!r}{suggest(str(phase), PHASES)}; phases: {', '.join(PHASES)}")
        if values is not None and not isinstance(values, dict):
            raise KdqError(f"qkd phase {phase!r} must be a mapping of training options, got {values!r}")
        fine_tune_config({**train, **(values or {})})


CHECKS["qkd"] = _check_phases
