"""Single-process, multi-GPU and multi-node training through one code path.

Launched by ``torchrun`` (env ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), a run
initialises a process group (nccl on CUDA, gloo on CPU) and wraps the model in DistributedDataParallel; without
those variables it is a world of one and nothing here talks to another process.

    torchrun --nproc_per_node=N -m training.train ARGS                       # one machine, N GPUs
    torchrun --nnodes=2 --node_rank=K --nproc_per_node=8 \
             --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m training.train ARGS   # two machines
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank among ``world_size`` processes, and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> a torch device (``cuda:LOCAL_RANK``). Raises ValueError when CUDA is asked
    for but absent, or for an unknown preference."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {preference!r}; use auto, cpu or cuda")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Read torchrun's environment; initialise the process group when ``WORLD_SIZE`` > 1. -> DistContext."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=device)


def shutdown(ctx: DistContext) -> None:
    """Tear the process group down (no-op for a world of one)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few floats over all ranks (float64). Identity for a world of one."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def gather_rows(rows: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Concatenate each rank's (n_r, ...) array along axis 0, in rank order, on every rank."""
    if not ctx.distributed:
        return rows
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, rows)
    return np.concatenate(parts, axis=0)


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's boolean, on every rank (for decisions such as early stopping)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item() > 0.5)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
