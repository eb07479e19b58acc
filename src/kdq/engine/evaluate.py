"""Accuracy in detail, and speed measured the same way for every model kdq compares."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (the CPU for a parameter-free module)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits for every row of `x`, in eval mode, batched; float32 on the model's device."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    try:
        outs = [model(x[i : i + batch_size].to(device)).float() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs)


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Top-1 (and top-5 with more than 5 classes), per-class accuracy and the confusion matrix."""
    y = y.to(logits.device)
    num_classes = logits.shape[1]
    pred = logits.argmax(1)
    confusion = torch.bincount(y * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    support = confusion.sum(1)
    per_class = confusion.diag().float() / support.clamp(min=1)
    metrics: dict[str, Any] = {
        "accuracy": (pred == y).float().mean().item(),
        "loss": nn.functional.cross_entropy(logits, y).item(),
        "num_samples": len(y),
    }
    if num_classes > 5:
        top5 = logits.topk(5, dim=1).indices
        metrics["top5"] = (top5 == y[:, None]).any(1).float().mean().item()
    metrics["per_class_accuracy"] = {name: round(per_class[i].item(), 6) for i, name in enumerate(classes)}
    metrics["confusion_matrix"] = confusion.cpu().tolist()
    return metrics


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _time_call(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure_speed(
    run: Callable[[torch.Tensor], Any],
    example: torch.Tensor,
    *,
    large_batch: int = 256,
    warmup: int = 10,
    repeats: int = 50,
    synchronize: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Median batch-1 latency after warm-up, and throughput at `large_batch`.

    `run` is any callable on a batch (a PyTorch module, an ONNX Runtime session wrapper), so
    every runtime is timed by the same code. `example` is one input sample, shape (1, ...).
    """
    sync = synchronize or (lambda: None)

    def timed(batch: torch.Tensor) -> Callable[[], None]:
        def call() -> None:
            run(batch)
            sync()

        return call

    one = example[:1]
    big = one.expand(large_batch, *one.shape[1:]).contiguous()
    with torch.inference_mode():
        latency = _time_call(timed(one), warmup, repeats)
        bulk = _time_call(timed(big), max(2, warmup // 5), max(5, repeats // 5))
    return {
        "latency_ms_batch1": statistics.median(latency) * 1e3,
        "throughput_per_s": large_batch / statistics.median(bulk),
        "throughput_batch": large_batch,
        "threads": torch.get_num_threads(),
    }


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The vector extensions that decide how fast int8 and float kernels run on an x86 CPU
# (the same int8 model ran 10x faster than float on an AMX Xeon and 1.14x on an AVX2 EPYC).
_CPU_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_extensions() -> list[str]:
    """Which of the extensions that matter for kernels this CPU has (empty off Linux/x86)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in _CPU_EXTENSIONS if f in flags]
    except OSError:
        pass
    return []


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where the numbers came from: the processor `device` names (default: the machine's best).

    Pass the device the model ran on: int8 PyTorch and ONNX Runtime run on the CPU even on a
    machine with a GPU, and their rows must not name the GPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "cpu": _cpu_name(),
        "cpu_flags": cpu_extensions(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
