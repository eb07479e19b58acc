"""Run and evaluate kdq ONNX exports with ONNX Runtime, timed by the same code as PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdq.deploy.metadata import first_line, load_onnx, read_onnx
from kdq.engine.evaluate import classification_metrics, environment, measure_speed, predict
from kdq.errors import KdqError

__all__ = ["OrtModel", "check_agreement", "evaluate_onnx", "load_onnx"]  # load_onnx: kept importable from here


class OrtModel:
    """An ONNX Runtime CPU session that takes and returns torch tensors, like the nn.Module it came from."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        data, _, self.meta = read_onnx(path)
        opts = ort.SessionOptions()
        # Same thread count as PyTorch by default, so speed comparisons are between runtimes, not thread pools.
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1  # a classifier is one chain of ops; parallel branches gain nothing
        # warnings about unused initializers etc. are noise for users, and its errors come back as
        # exceptions that kdq turns into one line: print only fatal messages
        opts.log_severity_level = 4
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises pybind exception types per failure
            raise KdqError(f"ONNX Runtime cannot load {self.path.name}: {first_line(exc)}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch; the input is copied to a contiguous float32 CPU array."""
        feed = {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        try:
            (out,) = self.session.run([self.output_name], feed)
        except Exception as exc:  # noqa: BLE001 - ORT raises pybind exception types per failure
            # typically a forward that used the batch size as a number, so the export froze it
            raise KdqError(
                f"ONNX Runtime cannot run {self.path.name} on a batch of shape {list(x.shape)}: {first_line(exc)[:200]}; "
                "if the model's forward turns a size into a Python number (len(x), int(...)), the export froze it: "
                "use x.shape[0] or reshape(-1, ...) instead"
            ) from None
        return torch.from_numpy(out)

    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Logits for every row of `x`, batched like `kdq.engine.evaluate.predict`."""
        return torch.cat([self(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def check_agreement(torch_model: nn.Module, ort_model: OrtModel, x: torch.Tensor) -> dict[str, Any]:
    """Fraction of identical argmax predictions and the largest absolute logit difference."""
    ref = predict(torch_model, x).cpu()
    got = ort_model.predict(x)
    return {
        "agreement": (ref.argmax(1) == got.argmax(1)).float().mean().item(),
        "max_abs_diff": (ref - got).abs().max().item(),
        "num_samples": len(x),
    }


def evaluate_onnx(
    path: str | Path,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: list[str] | None = None,
    *,
    speed: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Accuracy, size on disk and speed of an ONNX export; the same keys as `kdq.evaluate`.

    `x` must already be normalised with the export's mean/std (as for the PyTorch model);
    `classes` defaults to the ones stored in the file.
    """
    model = OrtModel(path, threads=threads)
    classes = list(classes if classes is not None else model.meta["classes"])
    logits = model.predict(x)
    if logits.shape[1] != len(classes):
        raise KdqError(f"{model.path.name} predicts {logits.shape[1]} classes but {len(classes)} were given")
    results: dict[str, Any] = {"runtime": "onnxruntime", "precision": model.meta.get("precision"),
                               "dataset": model.meta.get("dataset")}
    results.update(classification_metrics(logits, y, classes))
    results["size_bytes"] = model.path.stat().st_size
    if speed:
        results.update(measure_speed(model, x[:1]))
        results["threads"] = model.session.get_session_options().intra_op_num_threads
    results["environment"] = environment("cpu")  # the CPU execution provider
    return results
