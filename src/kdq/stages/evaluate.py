"""`kdq evaluate` / `kdq.evaluate`: score a module, a run directory or an exported ONNX file."""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdq.data import DataBundle, Split
from kdq.engine import (
    classification_metrics, count_macs, count_params, device_of, environment, measure_speed, predict, weight_sparsity,
)
from kdq.errors import KdqError
from kdq.io import save_weights, write_json
from kdq.report.plots import plot_confusion
from kdq.rundir.layout import WEIGHTS, eval_file
from kdq.rundir.load import load_run, renormalize, renormalized, resolve_data
from kdq.stages.registry import STAGES, StageKind
from kdq.stages.options import add_data_options, data_options, print_results

SPLITS = ("test", "val", "train")


def evaluate(
    model: nn.Module | str | Path,
    data: str | DataBundle | None = None,
    *,
    out: str | Path | None = None,
    split: str = "test",
    speed: bool = True,
    weights: Path | None = None,
) -> dict[str, Any]:
    """Accuracy (overall, top-5, per class), confusion matrix, params, MACs, sparsity, size on disk, speed.

    `model` is a module or a run directory (float, int8 or low-bit); with a run directory and
    no `data`, the data set it was trained on is used. A run directory's evaluation is written
    beside it (or in `out`) as eval-<split>.json, eval-<data>-<split>.json when `data` is given
    (kdq.rundir.layout.eval_file), with its confusion matrix as a PNG of the same name; the
    run's own results.json, written by the command that made it, is never touched. A module's
    is written only with `out`. `weights` names the module's saved weights file, for the size
    on disk.
    """
    weights_path = weights
    float_params = None
    runtime = "pytorch"
    if not isinstance(model, nn.Module):
        run_dir = Path(model)
        run = load_run(run_dir, data)  # checks classes and input shape; another data set's name is allowed
        bundle = run.data
        model = renormalized(run.model, run.meta, bundle)  # scored in the units it was saved with
        weights_path = run_dir / run.format.tensors
        float_params = run.meta.get("float_params")  # int8 modules hold packed weights, not parameters
        runtime = run.format.runtime
        out = run_dir if out is None else out
        name = eval_file(split, None if data is None else bundle.name)
    else:
        name = eval_file(split)
        if data is None:
            raise KdqError("evaluate needs data when given a module: kdq.evaluate(model, data)")
        bundle, _ = resolve_data(data)
    if split not in SPLITS:
        raise KdqError(f"split must be test, val or train, got {split!r}")
    part: Split = getattr(bundle, split)

    device = device_of(model)
    logits = predict(model, part.x.to(device))
    results: dict[str, Any] = {"runtime": runtime, "dataset": bundle.name, "split": split}
    results.update(classification_metrics(logits, part.y, list(bundle.classes)))
    results["params"] = float_params if float_params is not None else count_params(model)
    # int8 layers are counted from their shapes, so an int8 model has its float original's MACs
    results["macs"] = count_macs(model, part.x[:1].to(device))
    results["sparsity"] = weight_sparsity(model)
    results["size_bytes"] = size_on_disk(model, weights_path)
    if speed:
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        model.eval()
        results.update(measure_speed(model, part.x[:1].to(device), synchronize=sync))
    results["environment"] = environment(device)
    if out is not None:
        path = write_json(Path(out) / name, results)
        plot_confusion(results["confusion_matrix"], list(bundle.classes), path.with_suffix(".png"),
                       title=f"{bundle.name} {split}: accuracy {results['accuracy']:.4f}")
    return results


def size_on_disk(model: nn.Module, weights_path: Path | None) -> int:
    """Bytes of the saved safetensors weights (saved to a temporary file when not on disk yet).

    A quantized module is measured as kdq saves it: int8 values, scales and zero points; a
    low-bit one at its real bit width.
    """
    if weights_path is not None and weights_path.exists():
        return weights_path.stat().st_size
    from kdq.quant.lowbit import pack
    from kdq.quant.serialize import decompose_state

    if getattr(model, "kdq_lowbit", None) is not None and getattr(model, "kdq_spec", None):
        with tempfile.TemporaryDirectory() as tmp:
            return (pack.save_packed(model, tmp) / pack.TENSORS).stat().st_size
    try:
        tensors = decompose_state(model)[0]
    except KdqError:
        # State kdq cannot store (another library's packed type): measured, never loaded, through
        # torch's own format, so evaluation still reports a size.
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return buffer.getbuffer().nbytes
    with tempfile.TemporaryDirectory() as tmp:
        return save_weights(Path(tmp) / WEIGHTS, tensors).stat().st_size


def evaluate_onnx_file(path: str | Path, data: str | DataBundle | None = None, *, speed: bool = True,
                       write: bool = True) -> dict[str, Any]:
    """`kdq evaluate model.onnx`: run it with ONNX Runtime on the test set of its data set; the
    results are written beside it (`write`) as <name>.results.json and .confusion_matrix.png."""
    from kdq.deploy import evaluate_onnx, load_onnx

    path = Path(path)
    _, meta = load_onnx(path)
    bundle, _ = resolve_data(data if data is not None else meta["dataset"])
    x = renormalize(bundle.test.x, bundle, meta)
    results = evaluate_onnx(path, x, bundle.test.y, list(bundle.classes), speed=speed)
    results["split"] = "test"
    # carried from the model that was exported (None for a file exported before kdq recorded them)
    results["macs"], results["sparsity"] = meta.get("macs"), meta.get("sparsity")
    if meta.get("params") is not None:  # the exported model's, as kdq counts them (int8 packed weights too)
        results["params"] = meta["params"]
    if not write:
        return results
    stem = path.with_suffix("")
    write_json(stem.with_name(stem.name + ".results.json"), results)
    plot_confusion(results["confusion_matrix"], list(bundle.classes), stem.with_name(stem.name + ".confusion_matrix.png"),
                   title=f"{path.name} ({results.get('precision')}): accuracy {results['accuracy']:.4f}")
    return results


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory, or a .onnx file (run with ONNX Runtime)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--no-speed", action="store_true", help="skip latency and throughput measurement")
    add_data_options(parser, required=False)


def _cli(args: argparse.Namespace) -> None:
    data = None
    if args.data is not None:
        data, _ = resolve_data(args.data, **data_options(args))
    if args.run.endswith(".onnx"):
        results = evaluate_onnx_file(args.run, data, speed=not args.no_speed)
        print_results(results)
        print(f"wrote {Path(args.run).with_suffix('')}.results.json and .confusion_matrix.png", file=sys.stderr)
        return
    results = evaluate(args.run, data, split=args.split, speed=not args.no_speed)
    print_results(results)
    # the run's own results.json stays as the command that made it wrote it
    written = Path(args.run) / eval_file(args.split, None if data is None else data.name)
    print(f"wrote {written} and {written.with_suffix('.png').name}", file=sys.stderr)


STAGES.register(StageKind("evaluate", evaluate, "evaluate a run directory or an exported .onnx file", writes="float",
                          add_arguments=_arguments, run_cli=_cli, yaml=False))
