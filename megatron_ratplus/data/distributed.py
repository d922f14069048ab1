"""Share a reader's batch with the other ranks of its model-parallel group."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def broadcast_batch(tokens: torch.Tensor | None, *, src: int, group, shape: Sequence[int],
                    device: torch.device | str) -> torch.Tensor:
    """Broadcast a token batch from the reading rank ``src`` to every rank of ``group``.

    ``src`` is the reader's *global* rank (torch.distributed convention); on it ``tokens`` is the
    loader's ``[micro_batch_size, seq_len + 1]`` batch, elsewhere ``None``. Every rank passes the
    same ``shape`` and gets back an int64 tensor on ``device`` holding the reader's batch.
    Without an initialised process group (or a group of one) the batch is returned on ``device``.
    """
    dist = torch.distributed
    shape = tuple(int(s) for s in shape)
    single = not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1
    is_src = single or dist.get_rank() == src
    if is_src:
        if tokens is None:
            raise ValueError(f"rank {src} is the reader (src) of its group but was given no batch")
        if tuple(tokens.shape) != shape:
            raise ValueError(f"batch has shape {tuple(tokens.shape)}, expected {shape}")
        out = tokens.to(device=device, dtype=torch.int64, non_blocking=False)
        if single:
            return out
        out = out.contiguous()
    else:
        if tokens is not None:
            raise ValueError(f"rank {dist.get_rank()} is not the reader of its group (src={src}) but was given a batch")
        out = torch.empty(shape, dtype=torch.int64, device=device)
    dist.broadcast(out, src=src, group=group)
    return out
