"""Low-bit quantization-aware training of a run directory's model, optionally distilled.

    kdq.lowbit_qat("runs/teacher", "runs/w4a4", bits="w4a4", quantizer="lsq", teacher="runs/teacher")

The run directory it writes holds packed.safetensors + packed.json (weights at their real bit
width, no pickle), config.yaml, metrics.jsonl and results.json; `kdq evaluate` reads it back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from kdq.api import _renormalized, _run_data, evaluate, load_teacher
from kdq.data import DataBundle
from kdq.distill import Distiller, KDLoss
from kdq.engine import TrainConfig, count_params, fit
from kdq.quant.lowbit import LowBitConfig, quantize_lowbit, save_packed
from kdq.quant.lowbit.pack import TENSORS
from kdq.quantize_api import _data_record, _spec
from kdq.rundir import load_model, write_config, write_results

# A quantizer that handles one role only is paired with the usual partner for the other:
# PACT activations with DoReFa weights (as in the PACT paper), binary/ternary weights with LSQ
# activations.
PARTNER = {"pact": ("dorefa", "pact"), "binary": ("binary", "lsq"), "ternary": ("ternary", "lsq")}


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
    teacher: str | Path | nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    resume: bool = False,
    data: str | DataBundle | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune a run's float model at `bits` (e.g. "w4a4") with fake quantization; save it packed."""
    run, out = Path(run), Path(out)
    config = lowbit_config(bits, quantizer, act_quantizer, first_last_bits)
    # fine-tuning from float weights: short, with a moderate learning rate and no warm-up
    cfg = TrainConfig.from_dict({"epochs": 3, "lr": 0.01, "warmup_epochs": 0.0, **options})
    model, meta = load_model(run)
    _spec(model, run)  # a zoo model: load_packed rebuilds it from its kdq_spec, which quantize_lowbit keeps
    data = _run_data(run, data)
    qmodel = quantize_lowbit(model, config)
    objective = None
    if teacher is not None:
        objective = Distiller(load_teacher(teacher, data), KDLoss(temperature, alpha), "online", cfg.eval_batch_size)
    record = {"command": "qat-lowbit", "source": str(run), "bits": bits, "lowbit": config.to_dict(),
              "teacher": None if teacher is None else str(teacher), "temperature": temperature, "alpha": alpha,
              "train": cfg.to_dict(), "data": _data_record(data)}
    write_config(out, record)
    start = time.perf_counter()
    result = fit(qmodel, data, cfg, out, objective=objective, resume=resume)
    save_packed(qmodel.cpu(), out, meta={**meta, "float_params": count_params(model)})
    results = evaluate(_renormalized(qmodel, meta, data), data, out=out, weights=out / TENSORS)
    results.update(runtime="pytorch-fakequant", bits=bits, quantizer=config.to_dict(), params=count_params(model),
                   best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy,
                   train_time_s=time.perf_counter() - start)
    write_results(out, results)
    return results

