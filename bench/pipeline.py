"""Epoch time of kdq's tensor-resident pipeline against a standard DataLoader, and the cost of KD.

    .venv/bin/python bench/pipeline.py [--subset 20000] [--epochs 2] [--write BENCHMARKS.md]

Part 1 trains the same model for the same number of images with (a) kdq's BatchLoader, which
keeps the normalised data set as one tensor and augments a whole batch at once, and (b) a
torch DataLoader over a Dataset that crops, flips and normalises one sample at a time, as
most training scripts do. Part 2 times one epoch of the student trained alone, distilled from
an online teacher (the teacher runs on every batch) and from a cached teacher (logits computed
once, then looked up). Timings are medians over epochs after a warm-up epoch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import kdq  # noqa: E402
from kdq.data import BatchLoader, DataBundle  # noqa: E402
from kdq.distill import Distiller, KDLoss  # noqa: E402
from kdq.engine import TrainConfig, describe_machine, environment, fit  # noqa: E402
from kdq.report.table import markdown_table  # noqa: E402


class PerSampleImages(Dataset):
    """The usual pattern: uint8 images, transformed one by one in __getitem__."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, pad: int, flip: bool):
        self.images, self.labels, self.mean, self.std, self.pad, self.flip = images, labels, mean, std, pad, flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float().div(255)  # ToTensor
        if self.pad:  # RandomCrop(size, padding)
            x = F.pad(x, (self.pad,) * 4)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, dy : dy + self.images.shape[2], dx : dx + self.images.shape[3]]
        if self.flip and torch.rand(()) < 0.5:  # RandomHorizontalFlip
            x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[i]  # Normalize


def _train_epoch(model, batches, optimizer, sync) -> float:
    model.train()
    start = time.perf_counter()
    for x, y, *_ in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    return time.perf_counter() - start


def _loaders(data: DataBundle, batch: int, device: torch.device) -> dict:
    # Undo the normalisation to get back the uint8 images a per-sample pipeline would start from.
    mean, std = data.mean[0], data.std[0]
    images = (data.train.x * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)
    per_sample = PerSampleImages(images, data.train.y, mean, std, data.crop_padding, data.flip)
    on_device = data.train.to(device)
    pin = device.type == "cuda"

    def to_device(batches):
        for x, y in batches:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return {
        "kdq BatchLoader (tensor-resident, whole-batch augmentation)": lambda g: BatchLoader(
            on_device, batch, shuffle=True, crop_padding=data.crop_padding, flip=data.flip, drop_last=True).epoch(g),
        "torch DataLoader, per-sample transforms, num_workers=0": lambda g: to_device(DataLoader(
            per_sample, batch, shuffle=True, drop_last=True, generator=g, num_workers=0, pin_memory=pin)),
        "torch DataLoader, per-sample transforms, num_workers=2": lambda g: to_device(DataLoader(
            per_sample, batch, shuffle=True, drop_last=True, generator=g, num_workers=2, pin_memory=pin)),
    }


def bench_pipeline(data: DataBundle, models: list[str], epochs: int, batch: int, device: torch.device) -> list[dict]:
    """Epoch time per loader: with no model (the data path alone), then training each model."""
    rows = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for model_name in [None, *models]:
        group = []
        for name, make in _loaders(data, batch, device).items():
            torch.manual_seed(0)
            if model_name is None:
                def run_epoch(g, make=make):
                    start = time.perf_counter()
                    for _ in make(g):
                        pass
                    sync()
                    return time.perf_counter() - start
            else:
                model = kdq.create_model(model_name, data.num_classes, data.input_shape[0]).to(device)
                opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
                run_epoch = lambda g, make=make, model=model, opt=opt: _train_epoch(model, make(g), opt, sync)  # noqa: E731
            times = [run_epoch(torch.Generator().manual_seed(e)) for e in range(epochs + 1)][1:]
            group.append({"model": model_name or "(none: data only)", "pipeline": name, "epoch_s": statistics.median(times)})
        for r in group:
            r["images_per_s"] = len(data.train) / r["epoch_s"]
            r["vs_kdq"] = r["epoch_s"] / group[0]["epoch_s"]
        rows += group
    return rows


def bench_kd(data: DataBundle, student: str, teacher_name: str, epochs: int, batch: int) -> list[dict]:
    torch.manual_seed(0)
    teacher = kdq.create_model(teacher_name, data.num_classes, data.input_shape[0])  # speed only: weights don't matter
    cfg = TrainConfig(epochs=epochs + 1, batch_size=batch, progress=False)
    rows = []
    for name, objective in (
        ("student alone (cross-entropy)", None),
        (f"KD, online teacher ({teacher_name})", Distiller(teacher, KDLoss(4.0, 0.7), "online")),
        (f"KD, cached teacher ({teacher_name})", Distiller(teacher, KDLoss(4.0, 0.7), "cached")),
    ):
        torch.manual_seed(0)
        model = kdq.create_model(student, data.num_classes, data.input_shape[0])
        start = time.perf_counter()
        result = fit(model, data, cfg, objective=objective)
        total = time.perf_counter() - start
        times = [h["epoch_time_s"] for h in result.history][1:]
        setup = total - sum(h["epoch_time_s"] for h in result.history)
        rows.append({"training": name, "epoch_s": statistics.median(times), "setup_s": setup})
    base = rows[0]["epoch_s"]
    for r in rows:
        r["vs_plain"] = r["epoch_s"] / base
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--subset", type=int, default=20000, help="training images per epoch")
    p.add_argument("--models", default="cnn-small,resnet8", help="models for the pipeline comparison")
    p.add_argument("--student", default="cnn-small")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--write", help="append the report to this Markdown file")
    args = p.parse_args()

    data = kdq.load_dataset(args.data, subset=args.subset)
    device = kdq.engine.resolve_device("auto")
    pipe = bench_pipeline(data, args.models.split(","), args.epochs, args.batch_size, device)
    kd = bench_kd(data, args.student, args.teacher, args.epochs, args.batch_size)
    env = environment()
    cmd = "python bench/pipeline.py " + " ".join(sys.argv[1:])
    fmt = lambda rows, keys: [{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]  # noqa: E731
    report = "\n".join([
        f"### Data pipeline and distillation cost ({args.data}, {len(data.train)} training images)",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {describe_machine(env)}, {env['cpu_count']} cores, {env['threads']} torch threads, torch {env['torch']}",
        "",
        f"Epoch time on {device.type}, batch {args.batch_size}, random crop + flip, median of {args.epochs} epochs after a warm-up:",
        "",
        markdown_table(fmt(pipe, None), (("model", "model"), ("pipeline", "pipeline"), ("epoch_s", "epoch (s)"),
                                          ("images_per_s", "images/s"), ("vs_kdq", "time vs kdq"))),
        "",
        f"Epoch time of the {args.student} student, plain and distilled (T=4, alpha=0.7); setup = teacher caching and evaluation outside epochs:",
        "",
        markdown_table(fmt(kd, None), (("training", "training"), ("epoch_s", "epoch (s)"),
                                        ("vs_plain", "time vs plain"), ("setup_s", "setup + eval (s)"))),
        "",
    ])
    print(report)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
