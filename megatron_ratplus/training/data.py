"""Feeding the pipeline schedule: one reader per model replica, batches broadcast to its peers.

Only the rank with tensor- and pipeline-parallel rank 0 of each data-parallel replica reads from
the streaming dataset (partitioned by data-parallel rank); it broadcasts every micro-batch over the
model-parallel (TP × PP) group, so all TP/PP ranks of a replica see identical tokens, and the
loader's position (its state dict) is well defined for checkpoints.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from .config import ConfigError, RunConfig


def resolve_streams(cfg: RunConfig, *, seq_len: int) -> List[Dict]:
    """The train streams; prepares the embedded default corpus (rank 0) when none are given."""
    from ..data import prepare_default_dataset

    if cfg.data.streams:
        for s in cfg.data.streams:
            if not isinstance(s, dict) or not (s.get("local") or s.get("remote")):
                raise ConfigError(f"data.streams entries need 'local' and/or 'remote', got {s!r}")
        return [dict(s) for s in cfg.data.streams]
    directory = Path(cfg.data.default_dir)
    if dist.get_rank() == 0:
        prepare_default_dataset(directory, seq_len=seq_len, vocab_size=cfg.data.default_vocab_size,
                                size_mb=cfg.data.default_size_mb, seed=cfg.data.default_seed)
    dist.barrier()
    return [{"local": str(directory), "remote": None, "proportion": None}]


def dataset_manifest(streams: List[Dict]):
    """Manifest of the first stream that has a local copy (remote-only streams: None)."""
    from ..data import read_manifest

    for s in streams:
        local = s.get("local")
        if local and Path(local, "manifest.json").is_file():
            return read_manifest(local)
    return None


class TrainingData:
    """Micro-batches for the schedule, identical on all TP/PP ranks of a data-parallel replica."""

    def __init__(self, streams: List[Dict], *, seq_len: int, micro_batch_size: int, seed: int,
                 device, val_streams: Optional[List[Dict]] = None, cache_dir: Optional[str] = None,
                 num_workers: int = 0, readers_per_node: Optional[int] = None):
        from ..data import build_pretraining_loader

        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.device = device
        self.group = parallel_state.get_model_parallel_group()
        self.src = dist.get_global_rank(self.group, 0)
        self.is_reader = (parallel_state.get_tensor_model_parallel_rank() == 0
                          and parallel_state.get_pipeline_model_parallel_rank() == 0)
        if self.is_reader and dist.get_rank() != self.src:
            raise RuntimeError("data reader is not rank 0 of its model-parallel group")
        self.train_loader = self.val_loader = None
        self._train_iter = None
        if self.is_reader:
            mp = parallel_state.get_tensor_model_parallel_world_size() * \
                parallel_state.get_pipeline_model_parallel_world_size()
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            common = dict(seq_len=seq_len, micro_batch_size=micro_batch_size,
                          dp_rank=parallel_state.get_data_parallel_rank(),
                          dp_size=parallel_state.get_data_parallel_world_size(), seed=seed,
                          cache_dir=cache_dir, num_workers=num_workers,
                          readers_per_node=readers_per_node or max(1, local_world // mp))
            self.train_loader = build_pretraining_loader(streams, split="train", shuffle=True, **common)
            self.val_loader = build_pretraining_loader(val_streams or streams, split="val", shuffle=False,
                                                       **common)

    def _receive(self, batch: Optional[torch.Tensor]) -> torch.Tensor:
        from ..data import broadcast_batch

        shape = (self.micro_batch_size, self.seq_len + 1)
        if batch is not None:
            batch = batch.to(self.device, non_blocking=True)
        if self.group.size() == 1:
            return batch
        return broadcast_batch(batch, src=self.src, group=self.group, shape=shape, device=self.device)

    def next_microbatches(self, count: int) -> List[torch.Tensor]:
        out = []
        for _ in range(count):
            batch = None
            if self.is_reader:
                if self._train_iter is None:
                    self._train_iter = iter(self.train_loader)
                try:
                    batch = next(self._train_iter)
                except StopIteration:          # epoch boundary: the loader moves to the next epoch
                    self._train_iter = iter(self.train_loader)
                    batch = next(self._train_iter)
            out.append(self._receive(batch))
        return out

    def validation_microbatches(self, count: int) -> List[torch.Tensor]:
        """The first ``count`` validation micro-batches (the same ones at every evaluation)."""
        out = []
        it = iter(self.val_loader) if self.is_reader else None
        for _ in range(count):
            batch = next(it, None) if it is not None else None
            if self.is_reader and batch is None:
                raise ConfigError("the validation split has fewer micro-batches than logging.eval_iters")
            out.append(self._receive(batch))
        return out

    def state_dict(self) -> Optional[dict]:
        return self.train_loader.state_dict() if self.is_reader else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.is_reader and state is not None:
            self.train_loader.load_state_dict(state)
            self._train_iter = None
