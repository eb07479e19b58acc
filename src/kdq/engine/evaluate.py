"""Accuracy in detail, and speed measured the same way for every model kdq compares."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import sys
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
    """Weights and biases of `model`, counting those packed inside int8 layers too.

    int8 layers hold packed weights, not parameters: a quantized model counts as many as its
    float original, so a size comparison between the two is like for like.
    """
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        total += sum(t.numel() for t in _packed_tensors(module))
    return total


def _packed_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The weight and bias tensors an int8 module keeps outside its parameters."""
    from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase

    if isinstance(module, RNNBase):  # dynamic LSTM/GRU
        values = [*module.get_weight().values(), *module.get_bias().values()]
    elif callable(getattr(module, "weight", None)) and type(module).__module__.startswith("torch.ao.nn."):
        # int8 Linear and conv layers: weight() and bias() unpack their weights
        values = [module.weight(), module.bias() if callable(getattr(module, "bias", None)) else None]
    else:
        return []
    return [v for v in values if isinstance(v, torch.Tensor)]


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on one sample (the first of `example_input`).

    PyTorch's own FlopCounterMode counts the convolutions and matrix products a float or
    low-bit (fake-quantized) model runs; a MAC is two of its FLOPs. It does not see inside int8
    kernels, so each int8 convolution and linear layer is counted from its output and weight
    shapes, the same formula the flop counter applies (output elements x weight elements per
    output channel): an int8 model counts as many MACs as its float original. Batch norm,
    activations and pooling are not MACs and are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    int8_macs = [0]

    def count_int8(module: nn.Module, inputs: Any, output: Any) -> None:
        weight = module.weight()
        if isinstance(output, torch.Tensor) and isinstance(weight, torch.Tensor):
            int8_macs[0] += output.numel() * weight[0].numel()

    hooks = [m.register_forward_hook(count_int8) for m in model.modules() if _is_int8_layer(m)]
    was_training = model.training
    model.eval()  # dropout off and batch-norm statistics untouched: counting changes nothing
    try:
        with FlopCounterMode(display=False) as counter:
            model(example_input[:1])
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() // 2 + int8_macs[0]


def _is_int8_layer(module: nn.Module) -> bool:
    """An int8 convolution or linear layer: its weight() unpacks a quantized weight."""
    where = type(module).__module__
    return callable(getattr(module, "weight", None)) and where.startswith("torch.ao.nn.") and "quantized" in where


def weight_sparsity(model: nn.Module) -> float:
    """The fraction of exact zeros among the weights of the convolution and linear layers.

    The weights counted are those the model computes with: a float layer's weight, an int8
    layer's (zero exactly where the integer equals the zero point), a low-bit layer's
    quantized weight. 0.0 for a dense float model; an int8 or low-bit model also counts the
    small weights quantization rounds to zero. Biases and batch norm are not weights here.
    """
    zeros = total = 0
    with torch.no_grad():
        for module in model.modules():
            if _is_int8_layer(module):
                weight = module.weight()
                weight = weight.dequantize() if isinstance(weight, torch.Tensor) and weight.is_quantized else weight
            elif callable(getattr(module, "quantized_weight", None)):  # a low-bit layer (kdq.quant.lowbit)
                weight = module.quantized_weight()
            elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                weight = module.weight
            else:
                continue
            if isinstance(weight, torch.Tensor):
                zeros += int((weight == 0).sum())
                total += weight.numel()
    return zeros / total if total else 0.0


# Above this interquartile range / median, a timing says more about the machine than the model.
NOISY_SPREAD = 0.25
# A median this many times the fastest measurement: most measurements were slowed down.
NOISY_STALL = 4.0
# Measurements taken however long one call is (a stalled first call must not end the timing),
# unless a timing already took HARD_CAP_FACTOR times its max_time_s.
MIN_MEASUREMENTS = 5
HARD_CAP_FACTOR = 3


def _timings(fn: Callable[[], Any], min_time_s: float, max_time_s: float) -> tuple[list[float], int]:
    """Seconds per call of `fn`, one value per timed block of calls, and the calls per block.

    torch.utils.benchmark warms up, sizes the blocks so the timer's overhead is negligible,
    and keeps measuring (up to `max_time_s`) until the spread is small. On a busy machine one
    stalled call can exceed `max_time_s` alone: blocks are then added up to MIN_MEASUREMENTS,
    so the median is not a single stalled call.
    """
    from torch.utils import benchmark

    # num_threads: Timer would otherwise time with one thread, unlike every other kdq number
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measured = timer.adaptive_autorange(threshold=0.1, min_run_time=min_time_s, max_run_time=max_time_s)
    times, block = list(measured.times), measured.number_per_run
    while len(times) < MIN_MEASUREMENTS and sum(times) * block < HARD_CAP_FACTOR * max_time_s:
        times += timer.timeit(block).times
    return times, block


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75), interpolated linearly like torch.utils.benchmark's IQR."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    p25, median, p75 = statistics.quantiles(values, n=4, method="inclusive")
    return p25, median, p75


def _load_average() -> float | None:
    """The 1-minute load average before timing (None where the OS does not report it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _warn_if_noisy(what: str, times: list[float]) -> None:
    """A stderr warning when the timings of one call say more about the machine than the model."""
    if len(times) < MIN_MEASUREMENTS:
        return  # too few to judge (a model slow enough to fill the time with fewer)
    p25, median, p75 = _quartiles(times)
    fastest = min(times)
    if (p75 - p25) / median > NOISY_SPREAD or median > NOISY_STALL * fastest:
        print(f"kdq: warning: {what} timing is noisy (median {median * 1e3:.4g} ms, IQR {(p75 - p25) * 1e3:.4g} ms, "
              f"fastest {fastest * 1e3:.4g} ms over {len(times)} measurements): the machine was busy; "
              "rerun on an idle machine", file=sys.stderr)


def measure_speed(
    run: Callable[[torch.Tensor], Any],
    example: torch.Tensor,
    *,
    large_batch: int = 256,
    min_time_s: float = 0.2,
    max_time_s: float = 0.8,
    synchronize: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Batch-1 latency and throughput at `large_batch`: medians, quartiles and measurement counts.

    `run` is any callable on a batch (a PyTorch module, an ONNX Runtime session wrapper), so
    every runtime is timed by the same code. `example` is one input sample, shape (1, ...).
    Each of the two timings takes `min_time_s` to `max_time_s` seconds (longer while the
    spread stays large, or to reach MIN_MEASUREMENTS); a warning goes to stderr when the
    spread says the machine was busy.
    """
    sync = synchronize or (lambda: None)

    def timed(batch: torch.Tensor) -> Callable[[], None]:
        def call() -> None:
            run(batch)
            sync()

        return call

    one = example[:1]
    big = one.expand(large_batch, *one.shape[1:]).contiguous()
    load = _load_average()
    with torch.inference_mode():
        latency, latency_block = _timings(timed(one), min_time_s, max_time_s)
        bulk, bulk_block = _timings(timed(big), min_time_s, max_time_s)
    l25, l50, l75 = (t * 1e3 for t in _quartiles(latency))
    b25, b50, b75 = _quartiles(bulk)
    results = {
        "latency_ms_batch1": l50,
        "latency_ms_batch1_p25": l25,
        "latency_ms_batch1_p75": l75,
        "latency_ms_batch1_iqr": l75 - l25,
        "latency_ms_batch1_min": min(latency) * 1e3,
        "latency_measurements": len(latency),
        "latency_calls_per_measurement": latency_block,
        "throughput_per_s": large_batch / b50,
        # a slow quarter of the timings is the low quarter of the throughputs
        "throughput_per_s_p25": large_batch / b75,
        "throughput_per_s_p75": large_batch / b25,
        "throughput_per_s_iqr": large_batch / b25 - large_batch / b75,
        "throughput_measurements": len(bulk),
        "throughput_calls_per_measurement": bulk_block,
        "throughput_batch": large_batch,
        "threads": torch.get_num_threads(),
        # other processes competing for the cores: the usual cause of a noisy timing
        "load_average_1min": load,
    }
    _warn_if_noisy("batch-1 latency", latency)
    _warn_if_noisy(f"batch-{large_batch} throughput", bulk)
    return results


@functools.cache
def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line of /proc/cpuinfo (None off Linux); read once per field."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


# The vector extensions that decide how fast int8 and float kernels run on an x86 CPU
# (the same int8 model ran 10x faster than float on an AMX Xeon and 1.14x on an AVX2 EPYC).
_CPU_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_extensions() -> list[str]:
    """Which of the extensions that matter for kernels this CPU has (empty off Linux/x86)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in _CPU_EXTENSIONS if f in flags]


def describe_machine(env: dict[str, Any]) -> str:
    """'AMD EPYC (avx2, fma, avx512f, ...)' for an environment() record, with the CPU's
    extensions that decide kernel speed; a GPU record names the GPU, then the CPU."""
    flags = env.get("cpu_flags")
    extensions = ", ".join(flags) if flags else ("none of AVX2/AVX-512/VNNI/AMX" if flags == [] else "extensions not recorded")
    cpu = f"{env.get('cpu', env['device'])} ({extensions})"
    return cpu if env.get("device_type", "cpu") == "cpu" else f"{env['device']}, CPU {cpu}"


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
