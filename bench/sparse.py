"""What unstructured sparsity saves on disk, and that dense kernels do not run a sparse model faster.

    .venv/bin/python bench/sparse.py [--sizes resnet56,mobilenetv2] [--speed resnet20] [--sparsity 0.9]
                                     [--rounds 3] [--threads N]

Sizes: each model (10 classes, 1 input channel, untrained weights: magnitude pruning's file size
depends on the sparsity, not on what the weights learned) pruned by global magnitude at 50, 75,
90, 95 and 98% and written both ways, the dense safetensors file of a float run against the
sparse file (kdq.prune.sparse.sparse_sizes). Speed: the speed model dense and pruned to
--sparsity (masks made permanent: zeros in dense tensors), batch-1 latency and batch-256
throughput measured with kdq's own timer (kdq.engine.measure_speed) in alternating rounds, so
that a busy moment of the machine hits both alike. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from kdq.engine import describe_machine  # noqa: E402
from kdq.engine.evaluate import environment, measure_speed  # noqa: E402
from kdq.models import create_model  # noqa: E402
from kdq.prune import Magnitude, prune_magnitude, sparse_sizes  # noqa: E402

INPUT = (1, 28, 28)  # Fashion-MNIST's shape, the data set of the pruning benchmark


def sizes(models: list[str]) -> str:
    lines = ["| model | sparsity | dense file | sparse file (+ manifest) | smaller by |", "|---|---|---|---|---|"]
    for name in models:
        for row in sparse_sizes(create_model(name, 10, INPUT[0])):
            total = row["sparse_bytes"] + row["manifest_bytes"]
            lines.append(f"| {name} | {row['sparsity']:.0%} | {row['dense_bytes'] / 1e3:,.0f} kB | "
                         f"{row['sparse_bytes'] / 1e3:,.0f} kB (+ {row['manifest_bytes'] / 1e3:.0f} kB) | "
                         f"{row['dense_bytes'] / total:.1f}x |")
    return "\n".join(lines)


def speed(name: str, sparsity: float, rounds: int) -> str:
    torch.manual_seed(0)
    dense = create_model(name, 10, INPUT[0]).eval()
    sparse = create_model(name, 10, INPUT[0]).eval()
    sparse.load_state_dict(dense.state_dict())
    measured = prune_magnitude(sparse, Magnitude(sparsity, scope="global"))["sparsity"]
    example = torch.randn(1, *INPUT)
    runs: dict[str, list[dict]] = {"dense": [], "sparse": []}
    for _ in range(rounds):  # alternating, so a busy moment of the machine hits both
        for label, model in (("dense", dense), ("sparse", sparse)):
            runs[label].append(measure_speed(model, example, min_time_s=0.5, max_time_s=2.0))
    lines = [f"{name}, {torch.get_num_threads()} threads, medians of {rounds} alternating rounds; "
             f"{describe_machine(environment('cpu'))}", "",
             "| model | weights zero | batch-1 latency: median (fastest) | batch-256 throughput: median (best quarter) |",
             "|---|---|---|---|"]
    for label, zeros in (("dense", 0.0), ("sparse", measured)):
        # the fastest timings are the ones least disturbed by other processes on a shared machine
        latency = statistics.median(r["latency_ms_batch1"] for r in runs[label])
        fastest = min(r["latency_ms_batch1_min"] for r in runs[label])
        throughput = statistics.median(r["throughput_per_s"] for r in runs[label])
        best = max(r["throughput_per_s_p75"] for r in runs[label])
        lines.append(f"| {name} {label} | {zeros:.0%} | {latency:.2f} ms ({fastest:.2f} ms) | "
                     f"{throughput:,.0f} img/s ({best:,.0f} img/s) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="resnet56,mobilenetv2", help="models measured on disk ('' for none)")
    parser.add_argument("--speed", default="resnet20", help="model timed dense and sparse ('' for none)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sizes:
        print(sizes(args.sizes.split(",")), end="\n\n")
    if args.speed:
        print(speed(args.speed, args.sparsity, args.rounds))


if __name__ == "__main__":
    main()
