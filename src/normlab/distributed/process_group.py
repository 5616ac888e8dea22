"""Process-group setup for a rank started by :func:`normlab.distributed.launch` (or torchrun): gloo for
CPU tensors, NCCL for CUDA ones, rendezvous through the environment (``env://``)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from normlab.errors import NormlabError


def backend_for(device: str) -> str:
    """``nccl`` for CUDA devices (one GPU per rank), ``gloo`` otherwise."""
    return "nccl" if device.startswith("cuda") else "gloo"


def init_process_group(device: str = "cpu", timeout_s: float = 300.0) -> tuple[int, int, torch.device]:
    """Join the group described by ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``; returns
    ``(rank, world_size, device)`` where a CUDA rank gets ``cuda:LOCAL_RANK``."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise NormlabError(f"not started by a launcher: environment lacks {', '.join(missing)}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, where


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
