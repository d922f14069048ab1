"""Small torch.distributed helpers (rank, barrier, broadcast, any-rank flag) that also work in a process without a
process group, shared by the checkpoint manager, the preemption handler and the training start-up checks."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def barrier() -> None:
    if initialized():
        dist.barrier()


def flag_device() -> torch.device:
    """Where a collective's tensor must live: CUDA for NCCL, CPU for gloo (CPU mode)."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one rank (all_reduce MAX)."""
    if not initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
