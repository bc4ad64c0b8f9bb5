"""Process-group setup for torchrun (DDP): gloo on CPU, nccl on GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lipdeq.training.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> DistContext:
    """Initialise the default process group when launched by torchrun (``WORLD_SIZE > 1``).

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None (cuda when available), resolved by
    :func:`lipdeq.training.device.resolve_device` (an unknown or unavailable device is an error).
    Uses nccl for CUDA and gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank=local, distributed=world > 1)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a list of floats across ranks (identity in a single process)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def all_ranks_true(flag: bool, ctx: DistContext) -> bool:
    """True only if ``flag`` holds on every rank (so all ranks take the same branch)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=ctx.device)
    dist.all_reduce(t)
    return bool(t.item() == 0.0)


def cleanup_distributed() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
