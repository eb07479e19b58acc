"""Each scheme on its own, distilled, or taught by the scheme before it.

- individual: each scheme fine-tuned from the float model alone (cross-entropy only).
- apprentice: each scheme distilled directly from the float teacher (Mishra & Marr 2018),
  starting from the source's weights.
- takd-chain: the schemes in the order given, each taught and initialised by the one before
  it, the first by the float teacher (teacher assistants, Mirzadeh et al. 2020, applied to
  precision: 32 -> 16 -> 8 -> 4 -> 2 -> 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdq.data import DataBundle
from kdq.distill.objective import Method
from kdq.recipes.common import RECIPES, each_scheme, finished
from kdq.stages.lowbit import lowbit_qat


def _qat_each(name, source, out, bits, teacher_for, init_for, resume, **options) -> dict[str, dict[str, Any]]:  # noqa: ANN001
    """lowbit_qat for each scheme in order; `teacher_for`/`init_for(scheme_dir_before)` chain them."""
    results: dict[str, dict[str, Any]] = {}
    previous = None
    for scheme in each_scheme(name, bits, options.get("seed", 0)):
        run_dir = Path(out) / scheme
        done = finished(run_dir, resume)
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
    return _qat_each("individual", source, out, bits, lambda _: None, lambda _: source, resume, quantizer=quantizer,
                     act_quantizer=act_quantizer, first_last_bits=first_last_bits, data=data, **train)


@RECIPES.register("apprentice")
def apprentice(source: str | Path, out: str | Path, *, bits: str | Sequence[str], teacher: str | Path | None = None,
               distill_method: Method = "kd", temperature: float = 4.0, alpha: float = 0.7, quantizer: str = "lsq", act_quantizer: str | None = None,
               first_last_bits: int | None = 8, data: str | DataBundle | None = None, resume: bool = False,
               **train: Any) -> dict[str, dict[str, Any]]:
    """Each scheme starts from `source` and is distilled from `teacher` (default: `source` itself)."""
    teacher = teacher or source
    return _qat_each("apprentice", source, out, bits, lambda _: teacher, lambda _: source, resume, temperature=temperature,
                     alpha=alpha, distill_method=distill_method, quantizer=quantizer, act_quantizer=act_quantizer,
                     first_last_bits=first_last_bits, data=data, **train)


@RECIPES.register("takd-chain")
def takd_chain(source: str | Path, out: str | Path, *, bits: str | Sequence[str], teacher: str | Path | None = None,
               distill_method: Method = "kd", temperature: float = 4.0, alpha: float = 0.7, quantizer: str = "lsq", act_quantizer: str | None = None,
               first_last_bits: int | None = 8, data: str | DataBundle | None = None, resume: bool = False,
               **train: Any) -> dict[str, dict[str, Any]]:
    """The schemes in order, each initialised from the previous one's latent weights and taught
    by its quantized model; the first starts from `source`, taught by `teacher` (default `source`)."""
    teacher = teacher or source
    return _qat_each("takd-chain", source, out, bits, lambda before: before or teacher, lambda before: before or source, resume,
                     temperature=temperature, alpha=alpha, distill_method=distill_method, quantizer=quantizer,
                     act_quantizer=act_quantizer,
                     first_last_bits=first_last_bits, data=data, **train)
