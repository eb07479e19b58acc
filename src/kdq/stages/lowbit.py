"""Low-bit quantization-aware training of a run directory's model, optionally distilled.

    kdq.qat("runs/teacher", "runs/w4a4", bits="w4a4", quantizer="lsq", teacher="runs/teacher")

The run directory it writes holds packed.safetensors + packed.json (weights at their real bit
width, no pickle), config.yaml, metrics.jsonl and results.json; `kdq evaluate` reads it back.
The recipes (kdq.recipes) build on these functions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from kdq.data import DataBundle
from kdq.distill import Distiller, method_losses, method_record, parse_features
from kdq.distill.objective import Method
from kdq.engine import TrainConfig, count_params, distributed, fit
from kdq.engine.config import FINE_TUNE_DEFAULTS
from kdq.errors import KdqError
from kdq.io import load_weights
from kdq.models import create_model
from kdq.quant.lowbit import LowBitConfig, quantize_lowbit, save_packed
from kdq.quant.lowbit.pack import read_manifest
from kdq.rundir.claim import claim
from kdq.rundir.layout import BEST, PACKED_MANIFEST, PACKED_TENSORS, write_config
from kdq.rundir.load import data_record, load_model, load_teachers, renormalized, run_data
from kdq.stages.common import primary_results, record_results, zoo_spec
from kdq.stages.distill import teacher_record
from kdq.stages.evaluate import evaluate

# A quantizer that handles one role only is paired with the usual partner for the other:
# PACT activations with DoReFa weights (as in the PACT paper), binary/ternary weights with LSQ
# activations.
PARTNER = {"pact": ("dorefa", "pact"), "binary": ("binary", "lsq"), "ternary": ("ternary", "lsq")}
LOWBIT_KEYS = ("bits", "quantizer", "act_quantizer", "first_last_bits")


def lowbit_config(bits: str, quantizer: str = "lsq", act_quantizer: str | None = None,
                  first_last_bits: int | None = 8) -> LowBitConfig:
    """The LowBitConfig for a scheme such as "w4a4" and one quantizer name (see PARTNER)."""
    # an unknown name passes through PARTNER unchanged and is refused, with suggestions, by LowBitConfig
    weight_q, act_q = PARTNER.get(quantizer, (quantizer, quantizer))
    return LowBitConfig.parse(bits, weight_quantizer=weight_q, act_quantizer=act_quantizer or act_q,
                              first_last_bits=first_last_bits)


def lowbit_qat(
    run: str | Path,
    out: str | Path,
    *,
    bits: str,
    quantizer: str = "lsq",
    act_quantizer: str | None = None,
    first_last_bits: int | None = 8,
    teacher: str | Path | nn.Module | list[str | Path | nn.Module] | None = None,
    distill_method: Method = "kd",
    temperature: float = 4.0,
    alpha: float = 0.7,
    features: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    data: str | DataBundle | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune a run's model at `bits` (e.g. "w4a4") with fake quantization; save it packed.

    `run` is a float run, or a low-bit run whose latent float weights start this one (how
    the teacher-assistant chain passes each precision on to the next). `out` must be new or
    empty, unless `resume` continues the run there or `overwrite` replaces it.
    """
    run = Path(run)
    config = lowbit_config(bits, quantizer, act_quantizer, first_last_bits)
    cfg = fine_tune_config(options)
    model, meta, data = lowbit_source(run, data)
    objective, methods = teacher_objective(teacher, data, cfg, distill_method, temperature, alpha, features)
    record = {"command": "qat-lowbit", "source": str(run), "bits": bits, "lowbit": config.to_dict(),
              "teacher": teacher_record(teacher), "temperature": temperature, "alpha": alpha, **methods}
    return train_lowbit(quantize_lowbit(model, config), out, data, meta, cfg, record,
                        objective=objective, resume=resume, overwrite=overwrite, float_params=count_params(model))


def teacher_objective(teacher, data, cfg, method, temperature, alpha, features) -> tuple[Any, dict[str, Any]]:  # noqa: ANN001
    """The distillation objective of a fine-tuning run (None without a teacher), and what its
    config.yaml adds: the method and layer pairs, when other than Hinton KD on default layers."""
    if teacher is None:
        return None, {}
    losses = method_losses(method, temperature=temperature, alpha=alpha, label_smoothing=cfg.label_smoothing)
    pairs = parse_features(features)
    objective = Distiller(load_teachers(teacher, data), losses, "online", cfg.eval_batch_size, features=pairs,
                          label_smoothing=cfg.label_smoothing)
    return objective, method_record("distill_method", method, losses, pairs)


def fine_tune_config(options: dict[str, Any]) -> TrainConfig:
    """Training options for fine-tuning float weights: short, moderate lr, no warm-up."""
    return TrainConfig.from_dict({**FINE_TUNE_DEFAULTS, **options})


def lowbit_source(run: str | Path, data: str | DataBundle | None) -> tuple[nn.Module, dict[str, Any], DataBundle]:
    """The float model a low-bit run starts from, its metadata and its data.

    A float run gives its model. A low-bit run gives its architecture with the latent float
    weights its training kept (best.safetensors), quantizer state left out.
    """
    run = Path(run)
    if not (run / PACKED_MANIFEST).exists():
        model, meta = load_model(run)
        zoo_spec(model, run)  # a zoo model: load_packed rebuilds it from its kdq_spec, which quantize_lowbit keeps
        return model, meta, run_data(run, data)
    if not (run / BEST).exists():
        raise KdqError(f"{run} holds a packed low-bit model without its latent weights ({BEST}); "
                       "start from the float run it was made from, or rerun that stage")
    manifest = read_manifest(run / PACKED_MANIFEST)
    model = create_model(**manifest["spec"])
    floats = model.state_dict()
    state = {k: v for k, v in load_weights(run / BEST).items() if k in floats}
    model.load_state_dict(state)
    return model, manifest.get("meta", {}), run_data(run, data)


def train_lowbit(
    qmodel: nn.Module,
    out: str | Path,
    data: DataBundle,
    meta: dict[str, Any],
    cfg: TrainConfig,
    record: dict[str, Any],
    *,
    objective: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    float_params: int,
    started: float | None = None,
) -> dict[str, Any]:
    """Train a `quantize_lowbit` model into run directory `out`, save it packed, score it.

    `started` (a time.perf_counter() value) makes train_time_s
    count earlier phases too. Returns the results, also written to results.json.
    """
    out = Path(out)
    record = run_record(record, cfg, data)
    primary = distributed.is_primary()
    claimed = claim(out, "lowbit", record["command"], resume=resume, overwrite=overwrite, record=record)
    with distributed.primary_only(claimed, out):
        if primary:
            write_config(out, record)
        start = time.perf_counter() if started is None else started
        result = fit(qmodel, data, cfg, out, objective=objective, resume=resume)
        if not primary:  # under torchrun: rank 0 packs, scores and writes; the others take its results
            return primary_results(out)
        save_packed(qmodel.cpu(), out, meta={**meta, "float_params": float_params})
        results = evaluate(renormalized(qmodel, meta, data), data, weights=out / PACKED_TENSORS)
        results.update(runtime="pytorch-fakequant", bits=record.get("bits"), quantizer=qmodel.kdq_lowbit["config"],
                       params=float_params, best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy,
                       train_time_s=time.perf_counter() - start)
        record_results(out, results, data, title=f"{getattr(qmodel, 'kdq_spec', {}).get('name')} {record.get('bits')}")
    distributed.barrier()  # the other ranks read results.json, and a later scheme this run's files
    return results


def run_record(record: dict[str, Any], cfg: TrainConfig, data: DataBundle) -> dict[str, Any]:
    """A low-bit run's config.yaml: `record` with its training options and data."""
    return {**record, "train": cfg.to_dict(), "data": data_record(data)}
