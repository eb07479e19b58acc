"""Data-parallel training under torchrun: rank, world size and device from its environment.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/PORT) for every process it
starts. Without them, or with a world of one, every function here is a no-op and kdq runs as
one plain process. `init` starts the process group (gloo on the CPU, NCCL on CUDA, each
process on cuda:LOCAL_RANK); `teardown` ends it. Only the primary rank (0) writes files.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from kdq.errors import KdqError

# When set, fit prints every rank's final weight hash to stderr (the two-process test compares them).
DEBUG_HASH_ENV = "KDQ_DEBUG_RANK_HASH"

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def active() -> bool:
    """True in a torchrun world of two or more processes."""
    return world_size() > 1


def is_primary() -> bool:
    """The one process that writes run directories and prints progress (any lone process)."""
    return not active() or rank() == 0


def primary_only(context: AbstractContextManager[T], value: T) -> AbstractContextManager[T]:
    """`context` on the primary rank; on the others a stand-in that yields `value` and does nothing.

    Only rank 0 claims a run directory: `with distributed.primary_only(claim(out, ...), out):`.
    """
    return context if is_primary() else nullcontext(value)


def require_one_process(what: str) -> None:
    """Refuse, before anything is written, a command whose every rank would write the same files."""
    if active():
        raise KdqError(f"{what} runs as one process; under torchrun only train, distill, qat and recipe "
                       "are data-parallel")


def init(device: torch.device) -> torch.device:
    """Join the process group once; return this process's device.

    On CUDA that is cuda:LOCAL_RANK, whatever GPU `device` named: torchrun gives each process
    of a node its own GPU. fit calls this; a Python script under torchrun may call `teardown`
    when done (the CLI does).
    """
    if not active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)  # before NCCL starts, so each rank talks from its own GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place over all ranks; the same tensor back without torchrun."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        all_reduce_sum(t).div_(dist.get_world_size())
    return t


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` under torchrun, `model` itself otherwise.

    broadcast_buffers=False: BN running statistics are not sent at every forward (training
    uses batch statistics); `sync_buffers` averages them once an epoch instead.
    """
    if not dist.is_initialized():
        return model
    ids = [device.index] if device.type == "cuda" else None
    # newer torch renames the switch (and warns about the old name); both sync at construction
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_sync)


def _broadcast(tensors: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def broadcast_module(module: nn.Module | None) -> None:
    """Rank 0's parameters and buffers on every rank (an objective's parts, which DDP does not own)."""
    if module is not None and dist.is_initialized():
        _broadcast(list(module.parameters()) + list(module.buffers()))


def broadcast_buffers(module: nn.Module | None) -> None:
    """Rank 0's buffers on every rank: after validation, which moves int8 QAT observers (they
    observe in eval mode too) on each rank's own share of the validation split."""
    if module is not None and dist.is_initialized():
        _broadcast(list(module.buffers()))


def share_first_step(module: nn.Module | None) -> None:
    """After a run's first step: rank 0's parameters and non-floating buffers on every rank.

    State a module sets from the first batch it sees (LSQ step sizes and signs) starts from
    each rank's own share; from here on it is rank 0's. Parameters DDP keeps equal do not
    change; floating buffers (running statistics) are averaged at each epoch's end instead.
    """
    if module is not None and dist.is_initialized():
        _broadcast(list(module.parameters()) + [b for b in module.buffers() if not b.is_floating_point()])


def average_grads(module: nn.Module | None) -> None:
    """Mean of each parameter's gradient over the ranks, as DDP does for the model.

    Every rank runs the same code, so the same parameters have gradients on every rank
    and the collectives pair up.
    """
    if module is None or not dist.is_initialized():
        return
    for p in module.parameters():
        if p.grad is not None:
            all_reduce_mean(p.grad)


def sync_buffers(module: nn.Module | None) -> None:
    """Average floating buffers (BN running mean and variance) over the ranks, so every rank
    holds the same model for validation and saving; integer buffers (batch counts) already agree."""
    if module is None or not dist.is_initialized():
        return
    with torch.no_grad():
        for b in module.buffers():
            if b.is_floating_point():
                all_reduce_mean(b.data)


def state_hash(module: nn.Module) -> str:
    """sha256 over a module's state_dict, in key order: equal models give equal hashes."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def debug_print_hash(module: nn.Module | None, what: str = "weights") -> None:
    if module is not None and os.environ.get(DEBUG_HASH_ENV):
        print(f"kdq: rank {rank()} {what} sha256 {state_hash(module)}", file=sys.stderr)
