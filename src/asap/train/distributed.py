"""Data-parallel set-up: one process per device, launched by ``torchrun``.

``torchrun --nproc_per_node=N -m asap.cli.main train ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without
them a run is a single process and nothing here talks to a process group.
Backend: NCCL on GPUs, gloo on CPU. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import gc
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import Tensor

from asap.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``, and
    whether this module created the process group (and so must destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> this process's GPU if CUDA is available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:i"``.

    Raises :class:`ConfigError` for another name, or CUDA asked for where there is none.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:<index>, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the ``torchrun`` environment (if any).

    A process group that already exists (e.g. created by a test harness) is used as is.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size == 1 and not torch_dist.is_initialized():
        return DistInfo(device=resolve_device(device))
    dev = resolve_device(device, local_rank)
    owns = False
    if not torch_dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, dev, owns)


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group this module created.

    DDP reducers keep the group alive and can sit in reference cycles; collecting
    them first means no gloo worker thread outlives the group into interpreter
    shutdown, where it aborts the process (SIGABRT, "terminate called without
    an active exception").
    """
    if info.owns_group and torch_dist.is_initialized():
        gc.collect()
        torch_dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        torch_dist.barrier()


def all_reduce_sum(tensor: Tensor, info: DistInfo) -> Tensor:
    """Sum of ``tensor`` over all processes (a copy; the input is unchanged)."""
    out = tensor.clone()
    if info.distributed:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


def gather_stack(tensor: Tensor, info: DistInfo) -> Tensor:
    """``(world_size, *tensor.shape)``: every process's ``tensor`` (same shape everywhere), by rank."""
    if not info.distributed:
        return tensor.unsqueeze(0)
    # NCCL only moves GPU tensors; gloo takes CPU ones.
    local = tensor.to(info.device).contiguous()
    parts = [torch.empty_like(local) for _ in range(info.world_size)]
    torch_dist.all_gather(parts, local)
    return torch.stack(parts).to(tensor.device)
