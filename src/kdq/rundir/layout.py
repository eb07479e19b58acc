"""Every file a run directory holds, named once, and the read/write of its config and results.

A run directory is the unit of output: weights in safetensors, everything else in JSON/YAML.
Lower layers (training, int8 and low-bit serialisation) take their file names from here, so
this module imports nothing of kdq's but its errors, readers and schema checks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kdq.errors import KdqError
from kdq.io import read_json, read_yaml, write_json, write_text
from kdq.schema import Checker

# ---- a float model (kdq.rundir.load)
WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
FORMAT = "kdq-model"
# ---- every run
RUN_FILE = "run.json"  # {"kind": ..., "command": ..., "status": "running" | "finished"}
LOCK_FILE = ".kdq.lock"  # flock()ed by the process writing the directory; holds its pid
CONFIG = "config.yaml"
RESULTS = "results.json"
CONFUSION = "confusion_matrix.png"
CURVES = "training_curves.png"
EVAL_PREFIX = "eval-"  # `kdq evaluate RUN` writes eval-<split>.json / eval-<data>-<split>.json
# ---- training (kdq.engine.train)
CHECKPOINT = "checkpoint.pt"
BEST = "best.safetensors"  # the best epoch's weights (low-bit runs: latent float weights)
BEST_OBJECTIVE = "best_objective.safetensors"  # the best epoch's objective parts (adapters, heads)
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"  # folder of TensorBoard event files (--log tensorboard; kdq.engine.tracking)
# ---- int8 (kdq.quant.serialize) and low-bit (kdq.quant.lowbit.pack) models
INT8_TENSORS = "quantized.safetensors"
INT8_MANIFEST = "quantized.json"
PACKED_TENSORS = "packed.safetensors"
PACKED_MANIFEST = "packed.json"
# ---- a float model stored sparse: bitmask + nonzero values (kdq.prune.sparse)
SPARSE_TENSORS = "model.sparse.safetensors"
SPARSE_MANIFEST = "sparse.json"
# ---- a deployed model (kdq.stages.deploy): the ONNX file ONNX Runtime scored
DEPLOYED = "deployed.onnx"
DEPLOYED_FLOAT = "deployed.float.onnx"  # the float file an ONNX Runtime-calibrated int8 one was made from
# ---- folders of runs: experiments (kdq.experiment) and recipes (kdq.recipes)
STAGE_FILE = "stage.json"  # what configuration made an experiment's stage
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
PHASE_FILE = "phase.json"  # qkd: which phase of a scheme's run finished
SWEEP_MD = "sweep.md"
SWEEP_PNG = "sweep.png"
PHASE_DIRS = ("self_studying", "co_studying")  # qkd's intermediate phases inside a scheme's run
# ---- the comparison report (kdq.report.page): `kdq report --out DIR`, and every experiment folder
REPORT_HTML = "report.html"  # self-contained: figures embedded, opens from disk
REPORT_MD = "report.md"  # the same content; its figures are the PNGs beside it
REPORT_FIGURE = re.compile(r"report-[a-z0-9-]+\.png")  # report_figure()'s names (stale ones are removed)
# ---- weight rewinding and pruning rounds (kdq.engine.train --keep-epoch, kdq.stages.prune --rounds)
KEPT_EPOCH = re.compile(r"epoch-(\d+)\.safetensors")  # the weights after epoch k (k = 0: the initial ones)
ROUND_DIR = re.compile(r"round-(\d+)")  # a pruning round before the last, inside the run it leads to


def kept_epoch(epoch: int) -> str:
    """The file holding the weights a run kept after `epoch` (0: before training)."""
    return f"epoch-{epoch}.safetensors"


def report_figure(name: str) -> str:
    """The PNG of one report figure beside report.md, e.g. report-accuracy.png."""
    return f"report-{name}.png"


def round_dir(index: int) -> str:
    """The folder of pruning round `index` (1-based) inside the run directory of the last round."""
    return f"round-{index}"

# The files kdq writes in a run directory (so --overwrite knows exactly what is kdq's); any
# other file in the folder, e.g. an exported model.onnx, is left alone.
RUN_FILES = (
    RUN_FILE, CONFIG, RESULTS, WEIGHTS, MODEL_META, CONFUSION, CURVES,
    METRICS, CHECKPOINT, BEST, BEST_OBJECTIVE,
    INT8_TENSORS, INT8_MANIFEST, PACKED_TENSORS, PACKED_MANIFEST, DEPLOYED, DEPLOYED_FLOAT, SPARSE_TENSORS, SPARSE_MANIFEST,
    STAGE_FILE, SUMMARY_JSON, SUMMARY_MD, PHASE_FILE, SWEEP_MD, SWEEP_PNG, REPORT_HTML, REPORT_MD,
)

KINDS = ("float", "int8", "lowbit", "onnx", "recipe", "experiment")  # what a run directory holds (run.json)
# Stage, experiment and scheme names become folder names: plain names only, never paths.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_RESULT_NUMBERS = ("accuracy", "top5", "params", "size_bytes", "latency_ms_batch1", "throughput_per_s", "train_time_s")


def check_name(name: Any, what: str, reserved: tuple[str, ...] = ()) -> str:
    """`name` if it is a plain name (NAME_PATTERN) usable as a folder name and not one of
    `reserved` (files kdq writes beside it), else a KdqError."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise KdqError(f"{what} {str(name)[:80]!r} is not a plain name: use letters, digits, '.', '_' and '-', "
                       "starting with a letter or digit, at most 64 characters (never a path)")
    if name in reserved:
        raise KdqError(f"{what} {name!r} is the name of a file kdq writes beside it; choose another name")
    return name


def eval_file(split: str, data: str | None = None) -> str:
    """The file `kdq evaluate` writes in a run directory: eval-<split>.json for the run's own
    data set, eval-<data>-<split>.json for another (its confusion matrix: the same name, .png)."""
    if data is None:
        return f"{EVAL_PREFIX}{split}.json"
    return f"{EVAL_PREFIX}{re.sub(r'[^A-Za-z0-9._-]', '_', data)[:64]}-{split}.json"


def write_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    return write_text(Path(run_dir) / CONFIG, yaml.safe_dump(config, sort_keys=False))


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    config = read_yaml(path) if path.exists() else {}
    check = Checker(path)
    check.mapping(config)
    check.mapping(config.get("data", {}), "data")
    return config


def write_results(run_dir: str | Path, results: dict[str, Any]) -> Path:
    """results.json: written once per run, by the command that made it (kdq.stages.common)."""
    return write_json(Path(run_dir) / RESULTS, results)


def read_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS
    if not path.exists():
        return {}
    results = read_json(path, expect=dict)
    check = Checker(path)
    for key in _RESULT_NUMBERS:  # what summaries and reports compute with
        if results.get(key) is not None:
            check.number(results[key], key)
    if "environment" in results:
        check.mapping(results["environment"], "environment")
    return results
