"""Experiment tracking: a run's curves as TensorBoard event files, besides metrics.jsonl.

    kdq train --model resnet20 --data cifar10 --log tensorboard --out runs/r20
    tensorboard --logdir runs          # every run's <out>/tensorboard, side by side

fit() opens one tracker per run on the primary rank (`open_tracker`) and hands it each
epoch's record: every loss term, lr, train and validation accuracy and loss, images/s.
With `log_every=N` it also gets the batch loss every N steps, which costs one device sync
per N steps (reading a loss back waits for the GPU); per-epoch logging costs none.
TensorBoard is an optional dependency (`pip install 'kdq[tensorboard]'`): it is imported only
when a run asks for it, so kdq without it loses nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdq.errors import KdqError

INSTALL = "pip install 'kdq[tensorboard]'"


class Tracker:
    """Where a run's scalars go; this base class drops them (log: none, ranks other than 0)."""

    active = False  # whether step() keeps anything: fit reads no batch loss back for a tracker that drops it

    def epoch(self, record: dict[str, Any]) -> None:
        """One epoch's metrics record (the line fit appends to metrics.jsonl)."""

    def step(self, step: int, loss: float) -> None:
        """The batch loss at global step `step` (1-based, counted over the whole run)."""

    def close(self) -> None:
        """Flush what is buffered and release the files."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorBoard(Tracker):
    """Scalars into TensorBoard event files under `log_dir`, grouped as train/*, val/*, speed/*.

    A resumed run appends a new event file beside the old ones; TensorBoard reads them as one
    run (an epoch that was lost in the crash and trained again appears twice, the later last).
    """

    active = True

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's module imports the tensorboard package
            raise KdqError(f"log: tensorboard needs the tensorboard package ({str(exc).splitlines()[0][:80]}); "
                           f"install it with: {INSTALL}") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def epoch(self, record: dict[str, Any]) -> None:
        epoch = record["epoch"]
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(key), value, epoch)
        # written each epoch, so an interrupted run keeps every finished epoch's curves
        self.writer.flush()

    def step(self, step: int, loss: float) -> None:
        self.writer.add_scalar("step/loss", loss, step)

    def close(self) -> None:
        self.writer.close()


def scalar_tag(key: str) -> str:
    """A metrics record's key as a TensorBoard tag: train_kd -> train/kd, val_accuracy ->
    val/accuracy, images_per_s -> speed/images_per_s, lr -> train/lr."""
    group, _, name = key.partition("_")
    if group in ("train", "val") and name:
        return f"{group}/{name}"
    if key in ("images_per_s", "epoch_time_s"):
        return f"speed/{key}"
    return f"train/{key}"


def open_tracker(kind: str, log_dir: str | Path | None) -> Tracker:
    """The tracker for TrainConfig.log `kind` writing into `log_dir`; None (not the primary
    rank, or no run directory) gives the tracker that drops everything."""
    if kind == "none" or log_dir is None:
        return Tracker()
    if kind == "tensorboard":
        return TensorBoard(log_dir)
    raise KdqError(f"log must be none or tensorboard, got {kind!r}")
