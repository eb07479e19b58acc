"""The run directory: the unit of output. Weights in safetensors, everything else in JSON/YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch import nn

from kdq.errors import KdqError
from kdq.io import load_weights, read_json, save_weights, write_json, write_text

WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
CONFIG = "config.yaml"
RESULTS = "results.json"
FORMAT = "kdq-model"


def save_model(run_dir: str | Path, model: nn.Module, data_meta: dict[str, Any]) -> Path:
    """Write model.safetensors and model.json: enough to rebuild the model without pickle."""
    run_dir = Path(run_dir)
    save_weights(run_dir / WEIGHTS, model.state_dict())
    meta = {"format": FORMAT, "version": 1, "architecture": getattr(model, "kdq_spec", None), **data_meta}
    write_json(run_dir / MODEL_META, meta)
    return run_dir / WEIGHTS


def read_model_meta(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KdqError(f"run directory {str(run_dir)!r} not found; create it with `kdq train ... --out {run_dir}`")
    meta_path = run_dir / MODEL_META
    if not meta_path.exists():
        hint = " (training was interrupted: rerun the same command with --resume)" if (run_dir / "checkpoint.pt").exists() else ""
        raise KdqError(f"{run_dir} holds no finished model: {MODEL_META} is missing{hint}")
    try:
        meta = read_json(meta_path)
    except ValueError as exc:
        raise KdqError(f"{meta_path} is not valid JSON ({exc}); the run directory is damaged, retrain it") from None
    if meta.get("format") != FORMAT:
        raise KdqError(f"{meta_path} is not a kdq model description (format {meta.get('format')!r})")
    return meta


def load_model(run_dir: str | Path, module: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model from its run directory (or load the weights into `module`)."""
    from kdq.models import create_model

    run_dir = Path(run_dir)
    meta = read_model_meta(run_dir)
    if module is None:
        arch = meta.get("architecture")
        if arch is None:
            raise KdqError(f"{run_dir} holds a custom model kdq cannot rebuild; load it with kdq.load_model(path, module=YourModel())")
        module = create_model(arch["name"], arch["num_classes"], arch["in_channels"], **arch.get("kwargs", {}))
    try:
        module.load_state_dict(load_weights(run_dir / WEIGHTS))
    except (RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise KdqError(f"weights in {run_dir / WEIGHTS} do not fit the model: {first}") from None
    return module, meta


def write_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    return write_text(Path(run_dir) / CONFIG, yaml.safe_dump(config, sort_keys=False))


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def write_results(run_dir: str | Path, results: dict[str, Any]) -> Path:
    return write_json(Path(run_dir) / RESULTS, results)


def read_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS
    return read_json(path) if path.exists() else {}
