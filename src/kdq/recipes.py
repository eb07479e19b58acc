"""Quantization-aware distillation recipes: how a float model becomes a family of low-bit ones.

    from kdq import recipes
    recipes.run_recipe("takd-chain", "runs/teacher", "runs/chain", bits=["w16a16", "w8a8", "w4a4", "w2a2", "w1a2"])
    rows = recipes.sweep("apprentice", "runs/teacher", "runs/sweep/apprentice", bits=["w8a8", "w4a4"], seeds=[0, 1])

- individual: each scheme fine-tuned from the float model alone (cross-entropy only).
- apprentice: each scheme distilled directly from the float teacher (Mishra & Marr 2018),
  starting from the source's weights.
- takd-chain: the schemes in the order given, each taught and initialised by the one before
  it, the first by the float teacher (teacher assistants, Mirzadeh et al. 2020, applied to
  precision: 32 -> 16 -> 8 -> 4 -> 2 -> 1).
- qkd: three phases (Kim et al. 2019): self-studying (the quantized student alone),
  co-studying (teacher and student trained together, each distilled from the other, so the
  teacher becomes quantization-friendly; the teacher is the objective's trainable part),
  tutoring (teacher frozen, student distilled).
- speq: self-distillation (Boo et al. 2021). One set of weights; each step a teacher pass
  draws every layer's activation width from `teacher_bits`, and the student pass at the
  target width learns from it: cross-entropy + `cosine_weight` * (1 - cos(p_student, p_teacher)).

Every recipe writes one low-bit run directory per scheme, out/<scheme>/ (`kdq evaluate` and
`kdq export --format packed` read them), and returns {scheme: results}. With `resume=True` a
scheme that already has results is kept and an interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdq.api import load_teacher
from kdq.data import DataBundle
from kdq.distill import Distiller, KDLoss
from kdq.engine import count_params, distributed, fit
from kdq.config import TRAIN_KEYS
from kdq.engine.config import QKD_PHASE_EPOCHS, SEED_MAX
from kdq.engine.objectives import Objective, parts_of
from kdq.engine.train import BEST, BEST_OBJECTIVE
from kdq.errors import KdqError, suggest
from kdq.io import load_weights, write_json, write_text
from kdq.lowbit_api import fine_tune_config, lowbit_config, lowbit_qat, lowbit_source, run_record, train_lowbit
from kdq.quant.lowbit import quantize_lowbit
from kdq.quant.lowbit.layers import lowbit_layers
from kdq.registry import Registry
from kdq.rundir import check_name, claim, read_results

RECIPES = Registry("recipe")
PHASES = ("self_studying", "co_studying", "tutoring")
PHASE_FILE = "phase.json"
FLOAT_BITS = 32  # in teacher_bits: leave that layer's activations float


def run_recipe(name: str, source: str | Path, out: str | Path, *, overwrite: bool = False,
               **options: Any) -> dict[str, dict[str, Any]]:
    """Run recipe `name` (see RECIPES) from float run `source` into `out`; {scheme: results}.

    `out` must be new or empty, unless `resume=True` keeps its finished schemes (and resumes
    interrupted ones) or `overwrite` replaces it.
    """
    check_recipe(name, options)
    distributed.require_one_process(f"the {name} recipe")
    with claim(out, "recipe", "recipe", resume=bool(options.get("resume")), overwrite=overwrite):
        return RECIPES.get(name)(source, out, **options)


def sweep(name: str, source: str | Path, out: str | Path, *, seeds: Sequence[int] = (0,), overwrite: bool = False,
          **options: Any) -> list[dict[str, Any]]:
    """Run a recipe once per seed into out/seed<k>; one report row per (scheme, seed).

    Rows are what `kdq.report.sweep` tabulates and plots: recipe, bits, seed, accuracy,
    size_bytes and the float model's float_size_bytes. `resume` and `overwrite` as in run_recipe.
    """
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= SEED_MAX for s in seeds):
        raise KdqError(f"seeds must be a non-empty list of integers from 0 to {SEED_MAX}, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise KdqError(f"seeds lists a seed twice: {seeds}; a repeated seed repeats the same run, so give different seeds")
    check_recipe(name, {**options, "seed": seeds[0]})  # before anything is written
    distributed.require_one_process(f"the {name} sweep")
    float_size = read_results(source).get("size_bytes")
    rows = []
    with claim(out, "recipe", "recipe", resume=bool(options.get("resume")), overwrite=overwrite):
        for seed in seeds:
            results = run_recipe(name, source, Path(out) / f"seed{seed}", **{**options, "seed": seed})
            rows += [{"recipe": name, "bits": scheme, "seed": seed, "accuracy": r["accuracy"],
                      "size_bytes": r["size_bytes"], "float_size_bytes": float_size, "run": r.get("run_dir")}
                     for scheme, r in results.items()]
    return rows


def write_report(rows: list[dict[str, Any]], out: str | Path, reference: float | None, title: str,
                 float_name: str = "float") -> str:
    """sweep.md and sweep.png in `out`: accuracy against weight bits per recipe (mean ± std over
    seeds), sizes against k/32 of float + 10%; returns the Markdown."""
    from kdq.report.sweep import plot_sweep, size_table, sweep_table

    out = Path(out)
    plot_sweep(rows, out / "sweep.png", reference=reference, title=title)
    text = "## Low-bit sweep\n\n" + (f"Float model ({float_name}): {reference:.4f}.\n\n" if reference is not None else "")
    text += sweep_table(rows, reference) + "\n\n" + size_table(rows) + "\n\nplot: sweep.png\n"
    write_text(out / "sweep.md", text)
    return text


def check_recipe(name: str, options: dict[str, Any]) -> None:
    """Reject an unknown recipe, an option it does not take, a bad scheme or phase: one line each."""
    if name not in RECIPES:
        raise KdqError(f"unknown recipe {name!r}{suggest(str(name), RECIPES.names())}; choose from {', '.join(RECIPES.names())}")
    params = inspect.signature(RECIPES.get(name)).parameters
    own = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY]
    unknown = [k for k in options if k not in own and k not in TRAIN_KEYS]
    if unknown:
        raise KdqError(f"recipe {name!r} does not take {unknown[0]!r}{suggest(unknown[0], own + list(TRAIN_KEYS))}; "
                       f"it takes {', '.join(own)} and training options")
    train = {k: v for k, v in options.items() if k in TRAIN_KEYS}
    fine_tune_config(train)
    schemes = _schemes(options.get("bits"))
    for scheme in schemes:
        lowbit_config(scheme, options.get("quantizer", "lsq"), options.get("act_quantizer"), options.get("first_last_bits", 8))
    phases = options.get("phases") or {}
    if not isinstance(phases, dict):
        raise KdqError(f"phases must be a mapping of {', '.join(PHASES)} to training options, got {phases!r}")
    for phase, values in phases.items():
        if phase not in PHASES:
            raise KdqError(f"unknown qkd phase {phase!r}{suggest(str(phase), PHASES)}; phases: {', '.join(PHASES)}")
        if values is not None and not isinstance(values, dict):
            raise KdqError(f"qkd phase {phase!r} must be a mapping of training options, got {values!r}")
        fine_tune_config({**train, **(values or {})})
    if name == "speq":
        for scheme in schemes:
            _teacher_bits(lowbit_config(scheme).act_bits, options.get("teacher_bits"))
        weight = options.get("cosine_weight", 1.0)
        if not (isinstance(weight, (int, float)) and 0 <= weight < math.inf):
            raise KdqError(f"cosine_weight must be a finite number >= 0, got {weight!r}")
    # inf or nan here would train to nan: refused before anything is written (KDLoss's own checks)
    KDLoss(options.get("temperature", 1.0), options.get("alpha", 0.7))


def _schemes(bits: Any) -> list[str]:
    schemes = [bits] if isinstance(bits, str) else bits
    if not isinstance(schemes, (list, tuple)) or not schemes or not all(isinstance(s, str) for s in schemes):
        raise KdqError(f"bits must be a scheme such as w4a4 or a list of them, got {bits!r}")
    if len(set(schemes)) != len(schemes):
        raise KdqError(f"bits lists a scheme twice: {schemes}; each scheme gets one run directory")
    for scheme in schemes:  # each names a folder: out/<scheme>
        check_name(scheme, "bits scheme")
    return list(schemes)


def _finished(out: Path, resume: bool) -> dict[str, Any] | None:
    """A scheme's results when resuming and it already finished; else None."""
    return (read_results(out) or None) if resume else None


def _qat_each(source, out, bits, teacher_for, init_for, resume, **options) -> dict[str, dict[str, Any]]:  # noqa: ANN001
    """lowbit_qat for each scheme in order; `teacher_for`/`init_for(scheme_dir_before)` chain them."""
    results: dict[str, dict[str, Any]] = {}
    previous = None
    for scheme in _schemes(bits):
        run_dir = Path(out) / scheme
        done = _finished(run_dir, resume)
        if done is None:
            done = lowbit_qat(init_for(previous), run_dir, bits=scheme, teacher=teacher_for(previous),
                              resume=resume, **options)
        results[scheme] = {**done, "run_dir": str(run_dir)}
        previous = run_dir
    return results


@RECIPES.register("individual")
def individual(source: str | Path, out: str | Path, *, bits: str | Sequence[str], quantizer: str = "lsq",
               act_quantizer: str | None = None, first_last_bits: int | None = 8,
               data: str | DataBundle | None = None, resume: bool = False, **train: Any) -> dict[str, dict[str, Any]]:
    """Each scheme fine-tuned from `source` with cross-entropy alone: the no-distillation baseline."""
    return _qat_each(source, out, bits, lambda _: None, lambda _: source, resume, quantizer=quantizer,
                     act_quantizer=act_quantizer, first_last_bits=first_last_bits, data=data, **train)


@RECIPES.register("apprentice")
def apprentice(source: str | Path, out: str | Path, *, bits: str | Sequence[str], teacher: str | Path | None = None,
               temperature: float = 4.0, alpha: float = 0.7, quantizer: str = "lsq", act_quantizer: str | None = None,
               first_last_bits: int | None = 8, data: str | DataBundle | None = None, resume: bool = False,
               **train: Any) -> dict[str, dict[str, Any]]:
    """Each scheme starts from `source` and is distilled from `teacher` (default: `source` itself)."""
    teacher = teacher or source
    return _qat_each(source, out, bits, lambda _: teacher, lambda _: source, resume, temperature=temperature,
                     alpha=alpha, quantizer=quantizer, act_quantizer=act_quantizer,
                     first_last_bits=first_last_bits, data=data, **train)


@RECIPES.register("takd-chain")
def takd_chain(source: str | Path, out: str | Path, *, bits: str | Sequence[str], teacher: str | Path | None = None,
               temperature: float = 4.0, alpha: float = 0.7, quantizer: str = "lsq", act_quantizer: str | None = None,
               first_last_bits: int | None = 8, data: str | DataBundle | None = None, resume: bool = False,
               **train: Any) -> dict[str, dict[str, Any]]:
    """The schemes in order, each initialised from the previous one's latent weights and taught
    by its quantized model; the first starts from `source`, taught by `teacher` (default `source`)."""
    teacher = teacher or source
    return _qat_each(source, out, bits, lambda before: before or teacher, lambda before: before or source, resume,
                     temperature=temperature, alpha=alpha, quantizer=quantizer, act_quantizer=act_quantizer,
                     first_last_bits=first_last_bits, data=data, **train)


# ---- QKD


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
    if resume and (out / PHASE_FILE).exists():
        weights = load_weights(out / BEST)
        if any(k.startswith("student.") for k in weights):  # kdq before objectives had parts: one pair module
            objective.load_state_dict({k: v for k, v in weights.items() if k.startswith("teacher.")})
            weights = {k.removeprefix("student."): v for k, v in weights.items() if k.startswith("student.")}
        elif parts_of(objective) is not None:
            objective.load_state_dict(load_weights(out / BEST_OBJECTIVE))
        model.load_state_dict(weights)
        return
    result = fit(model, data, cfg, out, objective=objective, resume=resume)
    write_json(out / PHASE_FILE, {"train": cfg.to_dict(), "best_epoch": result.best_epoch,
                                  "best_val_accuracy": result.best_val_accuracy})


@RECIPES.register("qkd")
def qkd(source: str | Path, out: str | Path, *, bits: str | Sequence[str], teacher: str | Path | None = None,
        phases: dict[str, dict[str, Any]] | None = None, temperature: float = 4.0, alpha: float = 0.7,
        quantizer: str = "lsq", act_quantizer: str | None = None, first_last_bits: int | None = 8,
        data: str | DataBundle | None = None, resume: bool = False, **train: Any) -> dict[str, dict[str, Any]]:
    """QKD per scheme. `phases` maps self_studying / co_studying / tutoring to their own training
    options over `train` (default one epoch each); co-studying trains the teacher at the same lr.
    The phases run in out/<scheme>/self_studying and co_studying; tutoring writes out/<scheme>."""
    phases = phases or {}
    teacher = teacher or source
    results = {}
    for scheme in _schemes(bits):
        run_dir = Path(out) / scheme
        done = _finished(run_dir, resume)
        if done is None:
            started = time.perf_counter()  # train_time_s covers all three phases
            cfg = {p: fine_tune_config({"epochs": QKD_PHASE_EPOCHS, **train, **(phases.get(p) or {})}) for p in PHASES}
            config = lowbit_config(scheme, quantizer, act_quantizer, first_last_bits)
            model, meta, bundle = lowbit_source(source, data)
            student = quantize_lowbit(model, config)
            loss = KDLoss(temperature, alpha)
            teacher_net = load_teacher(teacher, bundle)
            record = {"command": "recipe", "recipe": "qkd", "source": str(source), "teacher": str(teacher),
                      "bits": scheme, "lowbit": config.to_dict(), "temperature": temperature, "alpha": alpha,
                      "phases": {p: c.to_dict() for p, c in cfg.items()}}
            # the phases write inside the scheme's run directory: claim it before the first
            with claim(run_dir, "lowbit", "recipe", resume=resume, record=run_record(record, cfg["tutoring"], bundle)):
                _phase(student, run_dir / "self_studying", bundle, cfg["self_studying"], None, resume)
                mutual = MutualKD(teacher_net, loss)
                _phase(student, run_dir / "co_studying", bundle, cfg["co_studying"], mutual, resume)
                tutor = Distiller(mutual.teacher, loss, "online", cfg["tutoring"].eval_batch_size)
                done = train_lowbit(student, run_dir, bundle, meta, cfg["tutoring"], record, objective=tutor,
                                    resume=resume, float_params=count_params(model), started=started)
        results[scheme] = {**done, "run_dir": str(run_dir)}
    return results


# ---- SPEQ


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
    for scheme in _schemes(bits):
        run_dir = Path(out) / scheme
        done = _finished(run_dir, resume)
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
