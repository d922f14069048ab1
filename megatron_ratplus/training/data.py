"""Feeding the pipeline schedule: one reader per model replica, batches broadcast to its peers.

Only the rank with tensor- and pipeline-parallel rank 0 of each data-parallel replica reads from
the streaming dataset (partitioned by data-parallel rank); it broadcasts every micro-batch over the
model-parallel (TP × PP) group, so all TP/PP ranks of a replica see identical tokens, and the
loader's position (its state dict) is well defined for checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..collectives import broadcast_object
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
    error = None
    if dist.get_rank() == 0:
        try:
            prepare_default_dataset(directory, seq_len=seq_len, vocab_size=cfg.data.default_vocab_size,
                                    size_mb=cfg.data.default_size_mb, seed=cfg.data.default_seed)
        except ValueError as e:        # e.g. default_dir holds a dataset prepared with other settings
            error = f"data.default_dir: {e}"
    error = broadcast_object(error)      # also the barrier: the dataset is ready for all ranks
    if error:
        raise ConfigError(error)
    return [{"local": str(directory), "remote": None, "proportion": None}]


def dataset_manifest(streams: List[Dict]):
    """Manifest of the first stream that has a local copy (remote-only streams: None)."""
    from ..data import read_manifest

    for s in streams:
        local = s.get("local")
        if local and Path(local, "manifest.json").is_file():
            return read_manifest(local)
    return None


def readers_per_node_from_hosts(hosts: List[str]) -> int:
    """Readers per node from the host of every reader, in data-parallel rank order.

    Streaming counts node ``n`` as readers ``n * R .. (n + 1) * R - 1`` and coordinates the readers
    of one host through shared memory, so the hosts must hold contiguous, equal blocks of readers.
    With pipeline parallelism Megatron's rank order puts every stage-0 rank, hence every reader,
    on the first nodes: the count per node is read from the placement, not guessed from the layout.
    """
    blocks: List[List[int]] = []
    for rank, host in enumerate(hosts):
        if blocks and hosts[blocks[-1][0]] == host:
            blocks[-1].append(rank)
        else:
            blocks.append([rank])
    sizes = {len(b) for b in blocks}
    if len({hosts[b[0]] for b in blocks}) != len(blocks) or len(sizes) != 1:
        placement = "; ".join(f"{hosts[b[0]]}: data-parallel ranks {b[0]}-{b[-1]}" for b in blocks)
        raise ConfigError(f"the data readers (tensor- and pipeline-parallel rank 0 of each replica) are not "
                          f"spread over the nodes in equal contiguous blocks ({placement}); set "
                          f"data.readers_per_node to the number of readers per node that streaming should assume")
    return sizes.pop()


def _reader_hosts() -> List[str]:
    """The host name of every reader, in data-parallel rank order (collective over the readers)."""
    import socket

    group = parallel_state.get_data_parallel_group()
    hosts: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return [str(h) for h in hosts]


def _raise_on_every_rank(error: Optional[str]) -> None:
    """Raise the first rank's error as a ConfigError on every rank (a collective: all ranks call it),
    so a refusal seen only by the data readers stops the whole job with its message, not a hang."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise ConfigError(first)


class TrainingData:
    """Micro-batches for the schedule, identical on all TP/PP ranks of a data-parallel replica.

    Both loaders check their datasets against the model (``vocab_size``, ``seq_len``), remote
    streams included, and the validation streams must share the training tokenizer. An evaluation
    reads ``eval_micro_batches``: a validation split with fewer is refused here, not at the first
    evaluation.
    """

    def __init__(self, streams: List[Dict], *, seq_len: int, micro_batch_size: int, seed: int,
                 device, val_streams: Optional[List[Dict]] = None, cache_dir: Optional[str] = None,
                 num_workers: int = 0, readers_per_node: Optional[int] = None,
                 vocab_size: Optional[int] = None, eval_micro_batches: int = 0,
                 global_batch_size: Optional[int] = None, verify_shards: bool = False):
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
        error = None
        if self.is_reader:
            dp_size = parallel_state.get_data_parallel_world_size()
            common = dict(seq_len=seq_len, micro_batch_size=micro_batch_size,
                          dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp_size, seed=seed,
                          cache_dir=cache_dir, num_workers=num_workers, vocab_size=vocab_size,
                          verify_shards=verify_shards)
            try:
                common["readers_per_node"] = readers_per_node or (
                    readers_per_node_from_hosts(_reader_hosts()) if dp_size > 1 else 1)
                # epochs cut at whole global batches: the same samples per step at every DP layout
                self.train_loader = build_pretraining_loader(streams, split="train", shuffle=True,
                                                             global_batch_size=global_batch_size, **common)
                # Separate validation data is checked against the model after its tokenizer is
                # compared with the training one: a foreign tokenizer is the root cause to report.
                val_common = dict(common, vocab_size=None) if val_streams else common
                self.val_loader = build_pretraining_loader(val_streams or streams, split="val",
                                                           shuffle=False, **val_common)
                self._check_validation(eval_micro_batches, vocab_size if val_streams else None)
            except (ConfigError, ValueError, FileNotFoundError) as e:   # (not a dataset, or no such directory)
                error = str(e)
        _raise_on_every_rank(error)       # only readers build loaders: every rank learns of a refusal

    def _check_validation(self, eval_micro_batches: int, vocab_size: Optional[int]) -> None:
        """The validation streams share the training tokenizer, then (``vocab_size`` given: they
        were not checked when built) fit the model; the split holds an evaluation's micro-batches."""
        from ..data import check_manifest_compat

        train = self.train_loader.manifest
        for val in self.val_loader.manifests:
            if (val.tokenizer_sha256, val.dtype) != (train.tokenizer_sha256, train.dtype):
                raise ConfigError(f"the validation data {val.path} was tokenized with another tokenizer than the "
                                  f"training data {train.path} (tokenizer sha256 {val.tokenizer_sha256[:12]} vs "
                                  f"{train.tokenizer_sha256[:12]}, {val.dtype} vs {train.dtype}): its loss would "
                                  f"not be comparable")
            if vocab_size is not None:
                check_manifest_compat(val, vocab_size=vocab_size, seq_len=self.seq_len)
        available = len(self.val_loader)
        if eval_micro_batches > available:
            raise ConfigError(f"an evaluation reads logging.eval_iters global batches, {eval_micro_batches} "
                              f"micro-batches per data-parallel rank, but the validation split gives "
                              f"{available} per rank (micro-batch size {self.micro_batch_size}): lower "
                              f"logging.eval_iters or use more validation data")

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
            if self.is_reader and batch is None:      # checked at start; kept for a changed dataset
                raise ConfigError(f"the validation split has fewer than the {count} micro-batches per rank "
                                  f"that logging.eval_iters asks for")
            out.append(self._receive(batch))
        return out

    def state_dict(self) -> Optional[dict]:
        return self.train_loader.state_dict() if self.is_reader else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Continue at the checkpoint's data position. A position that does not fit these datasets
        (other data, another split or sequence length) is a ConfigError on every rank: an exact
        resume is impossible, and the message says how to continue from the weights instead."""
        error = None
        if self.is_reader and state is not None:
            try:
                self.train_loader.load_state_dict(state)
            except ValueError as e:
                error = (f"the checkpoint's data position does not fit the configured training data: {e}. "
                         f"Resume with the data the run was trained on, or start a new run from these "
                         f"weights with checkpoint.init_from=<the checkpoint> (a fresh optimizer, schedule "
                         f"and data order) and checkpoint.load= (empty)")
            self._train_iter = None
        _raise_on_every_rank(error)
