"""What `--log tensorboard` costs: the same small model trained without logging, with per-epoch
TensorBoard scalars, and with the batch loss every N steps too.

    make install                        # installs kdq[tensorboard]
    .venv/bin/python bench/tracking.py [--model cnn-small] [--images 8192] [--epochs 3] [--rounds 3]
                                       [--log-every 10] [--batch-size 128] [--device auto] [--threads N]

(Not bench/tensorboard.py: a script's folder comes first on sys.path, and a file of that name
would stand in for the tensorboard package.)

Run it on an otherwise idle machine. The data are random 1x28x28 images in 10 classes built in
memory (Fashion-MNIST's shape; no download; speed does not depend on what the images show).
After one untimed warm-up run, each round trains the three variants once each, from the same
seed, in alternating order, so a busy moment of the machine hits them alike; the table gives
medians over rounds of:
- training images/s: fit's own per-epoch images_per_s (the batch loop; step logging's
  `.item()` every N steps is inside it), mean over epochs after the first (warm-up);
- wall s/epoch: the whole fit divided by its epochs, so validation, checkpoints, metrics.jsonl
  and the event files written after each epoch are counted too.
Prints a Markdown table with the CPU (or GPU) it ran on, the thread count and torch's version.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from kdq.data import DataBundle, Split  # noqa: E402
from kdq.engine import TrainConfig, describe_machine, environment, fit, resolve_device  # noqa: E402
from kdq.models import create_model  # noqa: E402

SHAPE = (1, 28, 28)
CLASSES = 10


def random_bundle(images: int) -> DataBundle:
    """Random images in memory: the loop's speed, not what it learns, is measured."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randn(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g))

    return DataBundle(name="random", train=split(images), val=split(images // 8), test=split(images // 8),
                      classes=[str(c) for c in range(CLASSES)], mean=[0.0], std=[1.0], input_shape=SHAPE,
                      crop_padding=2, flip=False)


def one_run(model: str, data: DataBundle, cfg: TrainConfig) -> tuple[float, float]:
    """(training images/s, wall seconds per epoch) of one fit into a fresh run directory."""
    torch.manual_seed(0)
    net = create_model(model, CLASSES, SHAPE[0])
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = fit(net, data, cfg, out)
        wall = time.perf_counter() - start
    rates = [r["images_per_s"] for r in result.history[1:]] or [result.history[0]["images_per_s"]]
    return statistics.mean(rates), wall / len(result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--images", type=int, default=8192, help="training images (random)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=10, help="steps between batch-loss scalars")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = random_bundle(args.images)
    common = dict(epochs=args.epochs, batch_size=args.batch_size, device=args.device, progress=False)
    variants = {
        "no logging": {},
        "tensorboard, per epoch": {"log": "tensorboard"},
        f"tensorboard + batch loss every {args.log_every} steps": {"log": "tensorboard", "log_every": args.log_every},
    }
    one_run(args.model, data, TrainConfig(**{**common, "epochs": 1}))  # warm-up: first-call set-up, caches
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for k in range(args.rounds):
        order = list(variants) if k % 2 == 0 else list(reversed(variants))  # alternate who goes first
        for name in order:
            measured[name].append(one_run(args.model, data, TrainConfig(**common, **variants[name])))
            print(f"round {k + 1}/{args.rounds}: {name}: {measured[name][-1][0]:,.0f} img/s", file=sys.stderr)

    base = statistics.median(rate for rate, _ in measured["no logging"])
    device = resolve_device(args.device)
    print(f"{args.model}, {args.images:,} random {'x'.join(map(str, SHAPE))} images, batch {args.batch_size}, "
          f"{args.epochs} epochs, medians of {args.rounds} alternating rounds; {describe_machine(environment(device))}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| logging | training images/s | vs no logging | wall s/epoch |\n|---|---|---|---|")
    for name, runs in measured.items():
        rate = statistics.median(r for r, _ in runs)
        wall = statistics.median(w for _, w in runs)
        print(f"| {name} | {rate:,.0f} | {(rate / base - 1) * 100:+.1f}% | {wall:.2f} |")
    print(f"\nreproduce: .venv/bin/python bench/tracking.py --model {args.model} --images {args.images} "
          f"--epochs {args.epochs} --rounds {args.rounds} --batch-size {args.batch_size} --log-every {args.log_every} "
          f"--device {args.device}" + (f" --threads {args.threads}" if args.threads else ""))


if __name__ == "__main__":
    main()
