"""The training loop: tensors in memory, whole-batch augmentation, resumable checkpoints."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kdq.data import BatchLoader, DataBundle, cutmix, mixup
from kdq.engine import distributed
from kdq.engine.config import TrainConfig
from kdq.engine.device import autocast, resolve_device, seed_everything
from kdq.engine.evaluate import predict
from kdq.engine.objectives import CrossEntropy, LossFunction, Objective, parts_of
from kdq.engine.tracking import Tracker, open_tracker
from kdq.errors import KdqError, short_repr
from kdq.io import append_jsonl, load_checkpoint, load_weights, read_text, save_checkpoint, save_weights, write_text
from kdq.rundir.layout import BEST, BEST_OBJECTIVE, CHECKPOINT, METRICS, TENSORBOARD, kept_epoch
from kdq.schema import DAMAGED, Checker


@dataclass
class FitResult:
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)


def build_optimizer(model: nn.Module, cfg: TrainConfig, parts: nn.Module | None = None) -> torch.optim.Optimizer:
    """SGD or AdamW over `model` and an objective's trainable `parts`, with the same decay rules."""
    params = [p for m in (model, parts) if m is not None for p in m.parameters() if p.requires_grad]
    if parts is not None:
        shared = {id(p) for p in model.parameters()} & {id(p) for p in parts.parameters()}
        if shared:
            raise KdqError(f"the objective {type(parts).__name__} registers the model being trained as one of its "
                           "parts; read it through prepare()'s model argument or keep it with Objective.hold()")
    # Weight decay on BN affine parameters and biases only hurts small nets; exempt 1-D tensors.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.schedule == "onecycle":
        # OneCycleLR divides by the warm-up length in steps, so it must span at least two
        pct = min(max(warmup, 2) / total, 0.5)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=pct)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, cosine)


def _mix(x, y, num_classes: int, cfg: TrainConfig, gen: torch.Generator):
    """Apply mixup or cutmix (one per batch, chosen at random when both are on)."""
    use_mixup = cfg.mixup > 0 and (cfg.cutmix == 0 or torch.rand((), generator=gen) < 0.5)
    if use_mixup:
        return mixup(x, y, num_classes, cfg.mixup, gen)
    return cutmix(x, y, num_classes, cfg.cutmix, gen)


def _val_metrics(model: nn.Module, data: DataBundle, cfg: TrainConfig) -> tuple[float, float]:
    if distributed.active():
        return _val_metrics_sharded(model, data, cfg)
    logits = predict(model, data.val.x, cfg.eval_batch_size)
    y = data.val.y.to(logits.device)
    loss = nn.functional.cross_entropy(logits, y).item()
    return (logits.argmax(1) == y).float().mean().item(), loss


def _val_metrics_sharded(model: nn.Module, data: DataBundle, cfg: TrainConfig) -> tuple[float, float]:
    """Each rank scores its share of the validation split; the sums are added over the ranks,
    so every rank gets the same numbers and takes the same best-epoch decision."""
    share = lambda t: t.tensor_split(distributed.world_size())[distributed.rank()]  # noqa: E731
    logits = predict(model, share(data.val.x), cfg.eval_batch_size)
    y = share(data.val.y).to(logits.device)
    loss = nn.functional.cross_entropy(logits, y, reduction="sum") if len(y) else logits.sum()
    totals = torch.stack([(logits.argmax(1) == y).sum().float(), loss.float(), torch.tensor(float(len(y)), device=y.device)])
    correct, loss_sum, n = distributed.all_reduce_sum(totals).tolist()
    return correct / n, loss_sum / n


def fit(
    model: nn.Module,
    data: DataBundle,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    objective: Objective | LossFunction | None = None,
    resume: bool = False,
    on_epoch_start: Callable[[int], None] | None = None,
    best_from: int = 1,
) -> FitResult:
    """Train `model` on `data.train`, select the epoch with the best validation accuracy.

    With `out_dir`, every epoch appends to metrics.jsonl and atomically rewrites
    checkpoint.pt (model, objective's parts, optimizer, schedule, RNG state), so `resume=True`
    continues an interrupted run; on the CPU it reaches the same final weights as an
    uninterrupted run. The optimizer covers the objective's trainable parts too. On return the
    model, and the objective's parts, hold the best epoch's weights (best.safetensors and
    best_objective.safetensors). `on_epoch_start(epoch)` (0-based) runs before each epoch,
    resumed ones included: QAT uses it to freeze BN statistics and observers. Epochs before
    `best_from` (1-based) are never kept as the best: a gradual pruning schedule's epochs
    before it reaches its final sparsity.

    With `cfg.log` "tensorboard" each epoch's record (and with `cfg.log_every` the batch loss)
    also goes to TensorBoard event files in out/tensorboard (kdq.engine.tracking). Early
    stopping (`cfg.patience`) is announced on stderr with the epoch it keeps.

    Under torchrun (kdq.engine.distributed) the model runs in DistributedDataParallel and the
    objective's parts have their gradients averaged; each rank trains on its share of every
    global batch of `cfg.batch_size`; state set from the first batch (LSQ step sizes) is rank
    0's after the first step; BN statistics and observers are averaged each epoch, and rank 0's
    kept after validation, so all ranks hold the same model; metrics are summed over the ranks;
    only the primary rank writes and prints.
    """
    out = Path(out_dir) if out_dir is not None else None
    world, primary = distributed.world_size(), distributed.is_primary()
    if world > 1 and cfg.batch_size % world:
        raise KdqError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over the "
                       f"{world} processes; use a multiple of {world}")
    if cfg.log != "none" and out is None:
        raise KdqError(f"log: {cfg.log} writes its files into the run directory; give an out directory "
                       "(--out), or train with log: none")
    device = distributed.init(resolve_device(cfg.device))
    seed_everything(cfg.seed, cfg.deterministic)
    model.to(device)
    data = data.to(device)
    if objective is None:
        objective = CrossEntropy(cfg.label_smoothing)
    if hasattr(objective, "prepare"):
        objective.prepare(model, data.train, device)
    parts = parts_of(objective)

    augment = cfg.augment
    loader = BatchLoader(
        data.train,
        cfg.batch_size,
        shuffle=True,
        crop_padding=data.crop_padding if augment else 0,
        flip=data.flip and augment,
        # a last batch of one sample breaks batch norm; drop the ragged tail when there is more than one batch
        drop_last=len(data.train) > cfg.batch_size,
        rank=distributed.rank() if world > 1 else 0,
        world_size=world,
    )
    optimizer = build_optimizer(model, cfg, parts)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    state = {"epoch": 0, "best_val_accuracy": -1.0, "best_epoch": 0, "bad_epochs": 0}
    history: list[dict[str, Any]] = []
    best_memory: dict[str, dict[str, torch.Tensor]] | None = None
    distributed.barrier()  # the primary has claimed (and perhaps cleared) `out` before any rank reads it
    if out is not None:
        if primary:
            out.mkdir(parents=True, exist_ok=True)
        if resume and (out / CHECKPOINT).exists():  # every rank loads the same checkpoint
            state = _restore(out / CHECKPOINT, model, objective, optimizer, scheduler, scaler, device)
            history = _read_history(out / METRICS, state["epoch"], rewrite=primary)
            if primary:
                print(f"kdq: resuming from epoch {state['epoch']} of {cfg.epochs}", file=sys.stderr)
        elif primary:
            (out / METRICS).unlink(missing_ok=True)
            (out / BEST_OBJECTIVE).unlink(missing_ok=True)
            shutil.rmtree(out / TENSORBOARD, ignore_errors=True)  # a fresh run's curves start empty too
    # DDP broadcasts rank 0's model on construction; the objective's parts get the same here.
    train_model = distributed.wrap(model, device)
    distributed.broadcast_module(parts)

    stopped_early = False
    if cfg.keep_epoch == 0 and state["epoch"] == 0 and out is not None and primary:
        save_weights(out / kept_epoch(0), model.state_dict())  # the initial weights, for weight rewinding
    # only the primary rank logs; the event files sit beside metrics.jsonl
    with open_tracker(cfg.log, out / TENSORBOARD if out is not None and primary else None) as tracker:
        for epoch in range(state["epoch"], cfg.epochs):
            if cfg.patience is not None and state["bad_epochs"] >= cfg.patience:
                stopped_early = True
                if primary:
                    print(f"early stop at epoch {state['epoch']}: no val gain for {state['bad_epochs']} epochs; "
                          f"keeping epoch {state['best_epoch']} (val {state['best_val_accuracy']:.4f})",
                          file=sys.stderr)
                break
            # One generator per epoch, seeded from (seed, epoch): shuffling and augmentation of a
            # resumed epoch are exactly those of an uninterrupted run.
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            if callable(getattr(objective, "start_epoch", None)):
                objective.start_epoch(epoch)
            record = _train_epoch(train_model, parts, loader, data, cfg, objective, optimizer, scheduler, scaler,
                                  device, gen, epoch, tracker)
            distributed.sync_buffers(model)
            distributed.sync_buffers(parts)
            if not math.isfinite(record["train_loss"]):  # before anything of this epoch is saved
                raise KdqError(f"training diverged: the loss is {record['train_loss']} at epoch {epoch + 1}; "
                               f"lower --lr (now {cfg.lr:g}) or the distillation temperature, then rerun")
            val_acc, val_loss = _val_metrics(model, data, cfg)
            distributed.broadcast_buffers(model)
            distributed.broadcast_buffers(parts)
            record.update(val_accuracy=val_acc, val_loss=val_loss)
            improved = epoch + 1 >= best_from and val_acc > state["best_val_accuracy"]
            if improved:
                state.update(best_val_accuracy=val_acc, best_epoch=epoch + 1, bad_epochs=0)
                if out is not None and primary:
                    save_weights(out / BEST, model.state_dict())
                    if parts is not None:
                        save_weights(out / BEST_OBJECTIVE, parts.state_dict())
                if out is None or world > 1:  # other ranks never read the primary's files mid-run
                    best_memory = {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
                                   for name, m in (("model", model), ("parts", parts)) if m is not None}
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            history.append(record)
            if primary:
                print(
                    f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
                    f"train {record['train_accuracy']:.4f}  val {val_acc:.4f}{'  *' if improved else ''}  "
                    f"{record['images_per_s']:.0f} img/s",
                    file=sys.stderr,
                )
            if out is not None and primary:
                if cfg.keep_epoch == epoch + 1:
                    save_weights(out / kept_epoch(epoch + 1), model.state_dict())
                append_jsonl(out / METRICS, record)
                tracker.epoch(record)
                save_checkpoint(out / CHECKPOINT,
                                _checkpoint(model, objective, optimizer, scheduler, scaler, state, device))

    if world > 1 and best_memory is not None:
        model.load_state_dict(best_memory["model"])
        if parts is not None:
            parts.load_state_dict(best_memory["parts"])
    elif out is not None and (out / BEST).exists():
        model.load_state_dict(load_weights(out / BEST))
        if parts is not None and (out / BEST_OBJECTIVE).exists():
            parts.load_state_dict(load_weights(out / BEST_OBJECTIVE))
    elif best_memory is not None:
        model.load_state_dict(best_memory["model"])
        if parts is not None:
            parts.load_state_dict(best_memory["parts"])
    if world > 1:
        distributed.debug_print_hash(model)
        distributed.debug_print_hash(parts, "objective")
    if callable(getattr(objective, "release", None)):  # feature taps come off the trained model
        objective.release()
    return FitResult(state["best_epoch"], state["best_val_accuracy"], state["epoch"], stopped_early, history)


def _train_epoch(model, parts, loader, data, cfg, objective, optimizer, scheduler, scaler, device, gen, epoch,
                 tracker: Tracker) -> dict:
    model.train()
    if parts is not None:
        parts.train()
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=device)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(
        total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
        # None: tqdm turns itself off when stderr is not a terminal (logs, CI)
        disable=None if cfg.progress and distributed.is_primary() else True, file=sys.stderr, dynamic_ncols=True,
    )
    for step, (x, y, idx) in enumerate(loader.epoch(gen)):
        targets = y
        if cfg.mixup > 0 or cfg.cutmix > 0:
            x, targets = _mix(x, y, data.num_classes, cfg, gen)
        with autocast(device, cfg.amp):
            logits = model(x)
            terms = objective(logits, targets, x, idx)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms["loss"]).backward()
        distributed.average_grads(parts)  # DDP averaged the model's during backward
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if epoch == 0 and step == 0:  # a resumed run restores this state instead
            distributed.share_first_step(model)
            distributed.share_first_step(parts)
        # Accumulate on the device; reading a value back would force a sync every step.
        for name, value in terms.items():
            sums[name] = sums.get(name, 0) + value.detach().float() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        bar.update()
        done = epoch * len(loader) + step + 1  # steps over the whole run, so every log_every-th is logged
        if tracker.active and cfg.log_every and done % cfg.log_every == 0:  # .item() syncs: only every N steps
            tracker.step(done, terms["loss"].item())
        if step % 20 == 0 and not bar.disable:
            rate = seen / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{(sums['loss'] / seen).item():.3f}",
                            acc=f"{(correct / seen).item():.3f}", img_s=f"{rate:.0f}")
    bar.close()
    if distributed.active():  # the epoch's totals over every rank's share
        for value in (*sums.values(), correct):
            distributed.all_reduce_sum(value)
        seen = int(distributed.all_reduce_sum(torch.tensor(float(seen), device=device)).item())
    elapsed = time.perf_counter() - start
    record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
    for name, total in sums.items():
        record["train_loss" if name == "loss" else f"train_{name}"] = (total / seen).item()
    record.update(train_accuracy=(correct / seen).item(), epoch_time_s=elapsed, images_per_s=seen / elapsed)
    return record


def _checkpoint(model, objective, optimizer, scheduler, scaler, state, device) -> dict[str, Any]:
    ckpt = {
        "model": model.state_dict(),
        "objective": _objective_state(objective),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": torch.get_rng_state(),
        **state,
    }
    if device.type == "cuda":
        ckpt["cuda_rng"] = torch.cuda.get_rng_state()
    return ckpt


def _objective_state(objective: object) -> dict[str, torch.Tensor]:
    return objective.state_dict() if isinstance(objective, nn.Module) else {}


def _restore(path: Path, model, objective, optimizer, scheduler, scaler, device) -> dict[str, Any]:  # noqa: ANN001
    """Load checkpoint.pt into the training objects and return the loop state it recorded.

    Its structure is checked first, so a damaged or foreign file is one KdqError line.
    A checkpoint written before objectives had parts has no "objective": it resumes an
    objective without parts.
    """
    ckpt = load_checkpoint(path)
    check = Checker(path)
    for key in ("model", "optimizer", "scheduler", "scaler"):
        check.mapping(check.key(ckpt, key), key)
    objective_state = check.mapping(check.key(ckpt, "objective", default={}), "objective")
    for name, value in objective_state.items():
        check.expect(isinstance(value, torch.Tensor), value, f"objective.{name}", "a tensor")
    rng = check.key(ckpt, "rng")
    check.expect(isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.dim() == 1,
                 type(rng).__name__, "rng", "a uint8 tensor (the RNG state)")
    epoch = check.integer(check.key(ckpt, "epoch"), "epoch", 0, 10**9)
    state = {"epoch": epoch, "best_val_accuracy": check.number(check.key(ckpt, "best_val_accuracy"), "best_val_accuracy")}
    for key in ("best_epoch", "bad_epochs"):
        state[key] = check.integer(check.key(ckpt, key), key, 0, epoch)
    try:
        model.load_state_dict(ckpt["model"])
        if isinstance(objective, nn.Module):
            objective.load_state_dict(objective_state)
        elif objective_state:
            raise KeyError("the checkpoint holds an objective's parts, this objective has none")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(rng)
        if device.type == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise KdqError(f"{path} does not fit this model and optimizer ({first}); resume with the options the run "
                       "was started with, or start over with --overwrite") from None
    return state


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Every epoch's record in a metrics.jsonl (what fit returns as FitResult.history).

    append_jsonl loses at most the line being written: a torn last line (no newline after it)
    is dropped. An unreadable line anywhere else means the file was damaged: one KdqError.
    """
    path = Path(path)
    text = read_text(path)
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            if number == len(lines) and not text.endswith("\n"):
                break  # torn by a crash mid-write
            raise KdqError(f"{path}: line {number} is not a metrics record ({short_repr(line)}); {DAMAGED}")
        rows.append(row)
    return rows


def _read_history(path: Path, epochs_done: int, rewrite: bool = True) -> list[dict[str, Any]]:
    """Keep the metrics of the epochs the checkpoint covers; drop lines of a lost epoch."""
    if not path.exists():
        return []
    rows = [r for r in read_history(path) if r["epoch"] <= epochs_done]
    if rewrite:  # only the primary rank writes
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows
