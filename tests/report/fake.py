"""Fake run directories for the comparison tests: valid files, written in milliseconds (a test helper)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

CLASSES = ["cat", "dog", "bird"]
ENV = {"device": "Test CPU", "device_type": "cpu", "cpu": "Test CPU", "cpu_flags": ["avx2"], "cpu_count": 2,
       "threads": 2, "torch": "x"}


def fake_run(path: Path, accuracy: float, *, seed: int = 0, dataset: str = "toy", lr: float = 0.1,
             kind: str = "float", model: str = "cnn-tiny", config: dict[str, Any] | None = None,
             history: bool = True, **results: Any) -> Path:
    """A finished run directory: run.json, config.yaml, results.json and metrics.jsonl.

    `results` overrides or adds results.json keys (None removes one); `config` overrides config.yaml keys.
    """
    path.mkdir(parents=True, exist_ok=True)
    per_class = {c: min(1.0, accuracy + 0.01 * i) for i, c in enumerate(CLASSES)}
    record = {
        "runtime": {"int8": "pytorch-int8", "lowbit": "pytorch-fakequant"}.get(kind, "pytorch"),
        "dataset": dataset, "split": "test", "accuracy": accuracy, "num_samples": 30,
        "per_class_accuracy": per_class, "confusion_matrix": [[8, 1, 1], [0, 9, 1], [1, 0, 9]],
        "params": 1000, "size_bytes": 4000 if kind == "float" else 1000, "macs": 20000,
        "latency_ms_batch1": 0.5, "latency_ms_batch1_iqr": 0.02, "throughput_per_s": 1000.0, "threads": 2,
        "environment": ENV, "train_time_s": 3.0,
    }
    record.update(results)
    record = {k: v for k, v in record.items() if v is not None}
    (path / "results.json").write_text(json.dumps(record))
    (path / "run.json").write_text(json.dumps({"kind": kind, "command": "train", "status": "finished"}))
    cfg = {"command": "train", "data": {"name": dataset, "seed": 0}, "model": {"name": model, "num_classes": 3},
           "train": {"epochs": 2, "lr": lr, "seed": seed, "progress": False}}
    cfg.update(config or {})
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    if history:
        lines = [{"epoch": e, "lr": lr, "train_loss": 1.0 / e, "train_ce": 0.8 / e, "train_kd": 0.2 / e,
                  "train_accuracy": 0.5 + 0.1 * e, "val_accuracy": accuracy - 0.1 / e, "val_loss": 1.1 / e}
                 for e in (1, 2)]
        (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def fake_experiment(root: Path, accuracies: dict[str, float], *, seed: int = 0,
                    compare: dict[str, str] | None = None) -> Path:
    """An experiment folder (as `kdq run` writes it): one stage per name, teacher-first order in summary.json."""
    root.mkdir(parents=True, exist_ok=True)
    for name, acc in accuracies.items():
        teacher = {"distill": {"teacher": str(root / "teacher")}} if name.startswith("kd") else {}
        fake_run(root / name, acc, seed=seed, model="big" if name == "teacher" else "small", config=teacher)
        (root / name / "stage.json").write_text("{}")
    summary = {"experiment": root.name, "stages": {name: {} for name in accuracies}}
    if compare is not None:
        summary["compare"] = compare
    (root / "summary.json").write_text(json.dumps(summary))
    (root / "run.json").write_text(json.dumps({"kind": "experiment", "command": "run", "status": "finished"}))
    return root


def keep_figures(monkeypatch, module) -> list:  # noqa: ANN001
    """Every figure `module` saves through its save_figure, kept for inspection (still written)."""
    seen: list = []
    save = module.save_figure

    def keep(fig, path):  # noqa: ANN001, ANN202
        seen.append(fig)
        return save(fig, path)

    monkeypatch.setattr(module, "save_figure", keep)
    return seen
