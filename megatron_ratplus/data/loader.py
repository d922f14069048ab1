"""Rank-aware pretraining loader over MDS shards, with exact resume (mosaicml-streaming).

Parallel layout. In the trainer only one process per data-parallel replica reads data (the
model-parallel rank 0 of the replica) and broadcasts each batch within its model-parallel group
(:func:`megatron_ratplus.data.broadcast_batch`). So the StreamingDataset's world is exactly the
readers: rank ``dp_rank`` of ``dp_size``, with ``readers_per_node`` of them per node. Streaming
reads its world from RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE and coordinates the
readers of a node through shared memory plus ``torch.distributed.barrier``; the loader sets those
variables while it builds the dataset (and restores them), and points streaming's barriers at the
readers' process group ``group`` instead of the whole job. Readers of one node must all build
their loaders (and start each epoch) together, as a training loop does.

Iteration yields ``torch.LongTensor [micro_batch_size, seq_len + 1]``.

Global order and epochs. Streaming lays an epoch out as one global sequence of samples that
depends only on (seed, epoch, num_canonical_nodes) and deals it out row by row: each row of
``dp_size`` consecutive positions gives one sample to every reader, and a micro batch takes
``micro_batch_size`` rows. So the ``global_batch_size`` positions of optimizer step ``k`` are
positions ``[k·G, (k+1)·G)`` of that sequence at any dp_size / micro_batch_size whose product
divides G. Streaming ends the sequence with padding (repeats of samples, so that every reader gets
as many), and dp-dependent padding would put a sample twice into one step. Every epoch is therefore
cut to the longest prefix that (a) holds no padding -- ``num_canonical_nodes · ⌊N /
num_canonical_nodes⌋`` of the epoch's N samples -- and (b) is a multiple of ``global_batch_size``;
the rest of the epoch is skipped (reshuffled into later epochs). Hence no sample repeats within an
epoch, no step spans two epochs, and the samples of every step are the same at every layout with
the same (seed, num_canonical_nodes, global_batch_size). num_canonical_nodes defaults to the number
of nodes of the first run and is kept by resumes: give it explicitly to compare fresh runs over
different node counts.

Epochs. A ``train`` loader iterates forever: when an epoch is exhausted the next one starts, with
streaming's per-epoch reshuffle (seed + epoch), so the sample order depends only on (seed, epoch).
Other splits (``val``) make one pass per ``iter()`` and always start from the beginning, so
every evaluation sees the same batches; their num_canonical_nodes defaults to 1, so an unshuffled
split is read in storage order (the same first samples) on any number of nodes. ``infinite=``
overrides either default.

Resume. The loader counts the samples consumed in the current epoch (globally: batches ×
micro_batch_size × dp_size, streaming's convention). ``state_dict()`` returns that position as a
small JSON-able dict; ``load_state_dict()`` in a new process makes the next batches exactly those
an uninterrupted run would have produced -- at another dp_size / micro_batch_size too, as long as
global_batch_size is the same (only which reader gets which sample of a step changes). Every
``iter()`` continues from the current position (it re-arms streaming's resume state), so
re-iterating a train loader never skips or repeats samples.

Integrity (see ``integrity`` for why). Shards are validated against their recorded xxh64 hash
whenever streaming fetches them from a remote or decompresses them; a mismatch raises
:class:`CorruptShardError` naming the file. Raw shards read in place are hashed only with
``verify_shards=True`` (every present file of the split, once, before the loader is built);
``ratplus-data validate DIR`` checks every file of a dataset. A dataset whose index records no
hash loads without these checks (with a warning).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import tempfile
import threading
import uuid
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..process_lifetime import die_with_parent
from .housekeeping import warn_about_leftovers
from .integrity import stream_hash, verify_split
from .manifest import COLUMN, INDEX_NAME, MANIFEST_NAME, TOKENIZER_NAME, DatasetManifest, read_manifest

STATE_VERSION = 1
_CONSTRUCT_LOCK = threading.Lock()
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class CorruptShardError(ValueError):
    """A shard file does not match the hash recorded when the dataset was written."""


# --------------------------------------------------------------------------------------------
# streams


@dataclass
class _Stream:
    local: str
    remote: str | None
    proportion: float | None
    manifest: DatasetManifest

    def describe(self, split: str) -> dict:
        info = self.manifest.splits[split]
        return {"remote": self.remote, "local": None if self.remote else self.local,
                "proportion": self.proportion, "samples": info.samples, "content_xxh64": info.content_xxh64}


def _is_uri(path: str) -> bool:
    return "://" in path


def _default_cache_root() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"ratplus-data-cache-{uid}"


def _fetch(remote_dir: str, name: str, local_dir: Path, timeout: float) -> Path:
    """Download ``remote_dir/name`` into ``local_dir/name`` (atomically); return the local path."""
    from streaming.base.storage.download import CloudDownloader

    remote_file = f"{remote_dir.rstrip('/')}/{name}"
    local_dir.mkdir(parents=True, exist_ok=True)
    tmp = local_dir / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        downloader = CloudDownloader.get(remote_dir)
        downloader.download(remote_file, str(tmp), timeout)
        downloader.clean_up()
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _resolve_remote(remote: str, local: str | None, cache_dir: str | os.PathLike | None, node: int,
                    num_nodes: int, timeout: float) -> tuple[str, DatasetManifest]:
    if local is None:
        root = Path(cache_dir) if cache_dir is not None else _default_cache_root()
        local_path = root / hashlib.sha1(remote.encode()).hexdigest()[:16]
        if num_nodes > 1:  # a shared-filesystem cache root must not mix nodes
            local_path = local_path / f"node{node}"
    else:
        local_path = Path(local)
    if not _is_uri(remote) and not Path(remote).is_dir():
        raise ValueError(f"remote dataset {remote} does not exist (not a directory)")
    try:
        fresh = _fetch(remote, MANIFEST_NAME, local_path, timeout)
    except Exception as exc:
        raise ValueError(f"remote dataset {remote} is not reachable: fetching {MANIFEST_NAME} failed "
                         f"({type(exc).__name__}: {exc})") from exc
    try:
        new = json.loads(fresh.read_text())
        cached_path = local_path / MANIFEST_NAME
        if cached_path.is_file():
            old = json.loads(cached_path.read_text())
            if old != new:
                raise ValueError(
                    f"cache directory {local_path} holds shards of a different dataset than {remote} "
                    f"(their manifests differ); delete it or use another cache_dir")
        os.replace(fresh, cached_path)
    finally:
        fresh.unlink(missing_ok=True)
    manifest = DatasetManifest.from_dict(new, path=local_path)
    if not (local_path / TOKENIZER_NAME).is_file():
        try:
            os.replace(_fetch(remote, TOKENIZER_NAME, local_path, timeout), local_path / TOKENIZER_NAME)
        except Exception as exc:  # noqa: BLE001 - the copy is a convenience for export, not needed to train
            warnings.warn(f"could not fetch {TOKENIZER_NAME} from {remote}: {exc}")
    return str(local_path), manifest


def _resolve_streams(streams, *, split: str, seq_len: int, cache_dir, node: int, num_nodes: int,
                     timeout: float) -> list[_Stream]:
    if isinstance(streams, (str, os.PathLike, Mapping)):
        streams = [streams]
    streams = list(streams)
    if not streams:
        raise ValueError("streams is empty: give at least one {'local': ..., 'remote': ..., 'proportion': ...}")
    out = []
    for i, s in enumerate(streams):
        if isinstance(s, (str, os.PathLike)):
            s = {"local": os.fspath(s)}
        unknown = set(s) - {"local", "remote", "proportion"}
        if unknown:
            raise ValueError(f"stream {i}: unknown keys {sorted(unknown)} (use local, remote, proportion)")
        local, remote, proportion = s.get("local"), s.get("remote"), s.get("proportion")
        local = os.fspath(local) if local is not None else None
        remote = os.fspath(remote) if remote is not None else None
        if local is None and remote is None:
            raise ValueError(f"stream {i}: give a local dataset directory or a remote")
        if remote is not None:
            local, manifest = _resolve_remote(remote, local, cache_dir, node, num_nodes, timeout)
        else:
            manifest = read_manifest(local)
        if split not in manifest.splits:
            raise ValueError(f"dataset {remote or local} has no {split!r} split (it has {sorted(manifest.splits)}"
                             + ("; it was prepared with --val-fraction 0" if split == "val" else "") + ")")
        if remote is None:
            _check_local_shards(local, split)
        out.append(_Stream(local=local, remote=remote, proportion=proportion, manifest=manifest))
    first = out[0].manifest
    for s in out:
        m = s.manifest
        if m.seq_len != seq_len:
            raise ValueError(f"dataset {s.remote or s.local} was packed for seq_len {m.seq_len} "
                             f"(samples of {m.seq_len + 1} tokens) but the loader was asked for seq_len {seq_len}")
        if (m.tokenizer_sha256, m.dtype) != (first.tokenizer_sha256, first.dtype):
            raise ValueError(
                f"datasets {out[0].remote or out[0].local} and {s.remote or s.local} were tokenised differently "
                f"(tokenizer sha256 {first.tokenizer_sha256[:12]} vs {m.tokenizer_sha256[:12]}); "
                f"mixed streams must share one tokenizer")
    if any(s.proportion is not None for s in out) and any(s.proportion is None for s in out):
        raise ValueError("give a proportion for every stream or for none")
    return out


def _shard_index(local: str, split: str) -> list:
    """The shard entries of a split's MDS ``index.json``; a ValueError naming the file if it cannot
    be read."""
    index_path = Path(local) / split / INDEX_NAME
    try:
        return json.loads(index_path.read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path} cannot be read as a shard index ({type(e).__name__}: {e})") from e


def _check_local_shards(local: str, split: str) -> None:
    """A dataset read in place must hold every shard its index lists (raw or compressed): name a
    missing one now, not when streaming reaches it mid-epoch with a message about remotes."""
    for shard in _shard_index(local, split):
        names = [meta["basename"] for meta in (shard.get("raw_data"), shard.get("zip_data")) if meta]
        if not any((Path(local) / split / name).is_file() for name in names):
            raise ValueError(f"dataset {local}: shard {' / '.join(names)} of the {split!r} split is missing "
                             f"(listed in {Path(local) / split / INDEX_NAME}); restore it or prepare the "
                             f"dataset again")


def _verify_local_shards(streams: list[_Stream], split: str) -> None:
    """``verify_shards=True``: hash the split's files present locally (a remote's cache may hold none
    yet: streaming checks those as it downloads them)."""
    for s in streams:
        if s.remote is not None and not (Path(s.local) / split / INDEX_NAME).is_file():
            continue
        problems = verify_split(s.local, split).problems
        if problems:
            raise CorruptShardError(f"dataset {s.remote or s.local}, split {split!r}: {len(problems)} damaged or "
                                    f"missing shard file(s): " + "; ".join(problems[:5])
                                    + ("; ..." if len(problems) > 5 else "")
                                    + " -- re-copy the dataset or prepare it again")


def _raw_shards_present(local: str, split: str) -> bool:
    return all((Path(local) / split / sh["raw_data"]["basename"]).is_file() for sh in _shard_index(local, split))


# --------------------------------------------------------------------------------------------
# building the StreamingDataset with a world of exactly the readers


class _ReaderDist:
    """Stands in for ``torch.distributed`` inside streaming while a dataset is being built:
    barriers go to the readers' group (or nowhere when a reader is alone on its node)."""

    def __init__(self, group) -> None:
        self._group = group

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self._group is not None

    def barrier(self) -> None:
        torch.distributed.barrier(group=self._group)

    def destroy_process_group(self) -> None:  # pragma: no cover - streaming only calls it after its own init
        pass


def _reader_group(group, *, dp_size: int, readers_per_node: int):
    """The process group whose barriers synchronise the readers, or None if none are needed."""
    if readers_per_node == 1:
        return None
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"readers_per_node={readers_per_node}: the readers of a node coordinate through torch.distributed; "
            f"initialise it first (and pass group=), or give readers_per_node=1 if every reader is alone on its node")
    if group is None and dist.get_world_size() != dp_size:
        group = _megatron_reader_group(dp_size)
    if group is None:
        if dist.get_world_size() != dp_size:
            raise ValueError(
                f"torch.distributed has {dist.get_world_size()} ranks but there are dp_size={dp_size} readers: pass "
                f"group=<the process group of the reading ranks> (the data-parallel group of model-parallel rank 0)")
        return dist.group.WORLD
    if dist.get_world_size(group) != dp_size:
        raise ValueError(f"group has {dist.get_world_size(group)} ranks but dp_size={dp_size}")
    return group


def _megatron_reader_group(dp_size: int):
    """On a reader (tensor- and pipeline-parallel rank 0) of a Megatron job, the data-parallel group
    is exactly the readers. Used only if Megatron's parallel state is already set up."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or not ps.model_parallel_is_initialized():
        return None
    if ps.get_tensor_model_parallel_rank() != 0 or ps.get_pipeline_model_parallel_rank() != 0:
        return None
    group = ps.get_data_parallel_group()
    return group if torch.distributed.get_world_size(group) == dp_size else None


@contextlib.contextmanager
def _streaming_world(*, rank: int, world: int, local_rank: int, local_world: int, node: int, group):
    import streaming.base.dataset as sd
    import streaming.base.shared.prefix as sp
    from filelock import FileLock

    for mod in (sd, sp):
        if not hasattr(mod, "dist"):
            raise RuntimeError(f"unsupported mosaicml-streaming layout: {mod.__name__} has no 'dist'")
    proxy = _ReaderDist(group)
    lock = FileLock(os.path.join(tempfile.gettempdir(), f"ratplus-streaming-init-node{node}.lock"))
    with _CONSTRUCT_LOCK:
        saved_env = {k: os.environ.get(k) for k in _ENV_KEYS}
        saved = [(sd, "dist", sd.dist), (sp, "dist", sp.dist), (sd, "maybe_init_dist", sd.maybe_init_dist)]
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                          LOCAL_WORLD_SIZE=str(local_world))
        sd.dist, sp.dist, sd.maybe_init_dist = proxy, proxy, (lambda: False)
        # Shared-memory prefixes are registered node-wide by scanning /dev/shm: serialise our
        # registrations (other jobs on this node) -- the node leader holds the lock, and the other
        # readers of the node start scanning only once it does.
        held = False
        try:
            if local_rank == 0:
                lock.acquire()
                held = True
            if proxy.is_initialized():
                proxy.barrier()
            yield
        finally:
            if held:
                lock.release()
            for mod, name, value in saved:
                setattr(mod, name, value)
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _make_dataset_class():
    from streaming import StreamingDataset
    from streaming.base.dataset import _ShardState

    class TokenStreamingDataset(StreamingDataset):
        """StreamingDataset that surfaces shard-preparation failures instead of hanging or truncating.

        Upstream (0.13), a failed fetch/decompress (e.g. a hash mismatch) leaves the shard marked
        PREPARING, so a reader blocked on that shard waits forever, and an exception in the
        background thread only ends the epoch early (the error goes to a log). Here a failed
        shard goes back to REMOTE (a waiter then retries and meets the same error itself), and
        the error is raised from the iterator -- a CorruptShardError for a hash mismatch.
        """

        _thread_error: BaseException | None = None

        def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
            try:
                super().prepare_shard(shard_id, blocking)
            except BaseException:
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    self._shard_states[shard_id] = _ShardState.REMOTE
                raise

        # Upstream, a background thread that raises never reports its exit, so the epoch's final
        # ``it.exit()`` (and the next epoch's) would wait for it forever.
        def _prepare_thread(self, it) -> None:
            try:
                super()._prepare_thread(it)
            except BaseException:
                it.on_exit()
                raise

        def _ready_thread(self, it) -> None:
            try:
                super()._ready_thread(it)
            except BaseException:
                it.on_exit()
                raise

        def on_exception(self, future) -> None:
            exc = future.exception()
            if exc is not None:
                if self._thread_error is None:
                    self._thread_error = exc
                self._event.set()

        def __iter__(self):
            try:
                yield from super().__iter__()
            except Exception as exc:
                cause = self._thread_error if self._thread_error is not None else exc
                if cause is not exc or _is_checksum_error(cause):
                    raise _explain(cause, self.streams) from exc
                raise
            if self._thread_error is not None:
                raise _explain(self._thread_error, self.streams)

    return TokenStreamingDataset


def _is_checksum_error(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and "Checksum failure" in str(exc)


def _explain(exc: BaseException, streams=()) -> BaseException:
    msg = str(exc)
    if _is_checksum_error(exc):
        path = msg.split("Checksum failure:", 1)[1].strip()
        algo = next((s.validate_hash for s in streams if Path(path).is_relative_to(s.local)), None) or "recorded"
        return CorruptShardError(
            f"corrupt shard {path}: its {algo} hash does not match the dataset's index.json "
            f"(damaged after `ratplus-data prepare` wrote it); re-copy the dataset or prepare it again "
            f"(`ratplus-data validate DIR` checks every file; a remote's cached copy can be deleted)")
    return RuntimeError(f"reading shards failed: {type(exc).__name__}: {exc}")


def _worker_init(_worker_id: int) -> None:
    """DataLoader worker: die with the parent. A worker waiting inside one of streaming's polling
    loops never reaches torch's parent-liveness check, so a killed trainer would leave it behind."""
    die_with_parent()


def epoch_samples(num_samples: int, num_canonical_nodes: int, global_batch_size: int) -> int:
    """Samples an epoch of ``num_samples`` uses (see "Global order and epochs" above).

    Streaming deals position ``p`` of the epoch from row ``p % ncn`` (a canonical node's contiguous
    share, its last sample repeated when N is not a multiple of ncn), column ``p // ncn``; every row
    has at least ``N // ncn`` real samples, so the first ``ncn · (N // ncn)`` positions are distinct
    and free of padding for any number of readers.
    """
    usable = num_canonical_nodes * (num_samples // num_canonical_nodes)
    return usable - usable % global_batch_size


def _collate(samples: list[dict]) -> torch.Tensor:
    return torch.from_numpy(np.stack([s[COLUMN] for s in samples]).astype(np.int64, copy=False))


# --------------------------------------------------------------------------------------------
# the loader


class PretrainingLoader:
    """Iterable of ``LongTensor [micro_batch_size, seq_len + 1]`` with ``state_dict`` for resume."""

    def __init__(self, dataset, *, streams: list[_Stream], split: str, seq_len: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, global_batch_size: int, seed: int, shuffle: bool, num_workers: int,
                 infinite: bool, num_canonical_nodes: int, initial_physical_nodes: int) -> None:
        self.dataset = dataset
        self.split = split
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.global_batch_size = global_batch_size
        self.shuffle = shuffle
        self.infinite = infinite
        self._streams = streams
        self._seed = seed
        self._ncn = num_canonical_nodes
        self._initial_physical_nodes = initial_physical_nodes
        self._epoch = 0
        self._sample_in_epoch = 0
        self._active: weakref.ref | None = None
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=micro_batch_size, num_workers=num_workers, collate_fn=_collate,
            drop_last=False, pin_memory=False, worker_init_fn=_worker_init if num_workers else None)

    # -- information ---------------------------------------------------------------------------
    @property
    def manifest(self) -> DatasetManifest:
        """Manifest of the first stream (all streams share tokenizer, seq_len and dtype)."""
        return self._streams[0].manifest

    @property
    def manifests(self) -> list[DatasetManifest]:
        return [s.manifest for s in self._streams]

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def num_samples(self) -> int:
        """Samples in one epoch, all ranks together (after stream proportions)."""
        return int(self.dataset.epoch_size)

    @property
    def samples_per_epoch(self) -> int:
        """Samples one epoch actually uses: ``num_samples`` cut to whole global batches."""
        return epoch_samples(self.num_samples, self._ncn, self.global_batch_size)

    def __len__(self) -> int:
        """Micro batches this rank yields in one whole epoch."""
        return self.samples_per_epoch // (self.micro_batch_size * self.dp_size)

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        self.close()
        gen = self._batches()
        # A weak reference: a dropped iterator is finalised at once (no reference cycle), which
        # shuts its DataLoader workers down cleanly instead of at some later garbage collection.
        self._active = weakref.ref(gen)
        return gen

    def close(self) -> None:
        """Stop the current iteration (its DataLoader workers and streaming threads)."""
        gen = self._active() if self._active is not None else None
        self._active = None
        if gen is not None:
            gen.close()

    def _arm(self) -> None:
        # Make streaming start exactly at our position: its resume state (in shared memory, seen by
        # DataLoader workers too) and its epoch counter (so the state is not judged stale).
        self.dataset.next_epoch = self._epoch
        self.dataset.load_state_dict(self._streaming_state())

    def _streaming_state(self) -> dict:
        return {
            "epoch": self._epoch,
            "sample_in_epoch": self._sample_in_epoch,
            "num_canonical_nodes": self._ncn,
            "shuffle_seed": self._seed,
            "initial_physical_nodes": self._initial_physical_nodes,
        }

    def _batches(self) -> Iterator[torch.Tensor]:
        step = self.micro_batch_size * self.dp_size
        if not self.infinite:
            self._epoch, self._sample_in_epoch = 0, 0
        while True:
            end = self.samples_per_epoch
            if end == 0:
                raise ValueError(
                    f"the {self.split!r} split has {self.num_samples} samples: too few for one global batch of "
                    f"{self.global_batch_size} ({self.micro_batch_size} per micro batch on each of "
                    f"{self.dp_size} data-parallel ranks)")
            remaining = (end - self._sample_in_epoch) // step
            if remaining > 0:
                self._arm()
                # Stop at the epoch's cut (see the module docstring), before streaming's padded tail.
                for batch in itertools.islice(self._loader, remaining):
                    if batch.shape[0] != self.micro_batch_size:
                        raise RuntimeError(f"streaming gave a partial micro batch ({batch.shape[0]} of "
                                           f"{self.micro_batch_size} samples) before the end of the epoch")
                    self._sample_in_epoch += step
                    yield batch
                if self._sample_in_epoch + step <= end:
                    raise RuntimeError(f"streaming ended epoch {self._epoch} at sample {self._sample_in_epoch}, "
                                       f"before its cut at {end}")
            self._epoch += 1
            self._sample_in_epoch = 0
            if not self.infinite:
                return

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position of this loader (JSON-able). The same on every reader of one run."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
            "streams": [s.describe(self.split) for s in self._streams],
            **self._streaming_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, possibly of another process)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        if state["split"] != self.split or state["seq_len"] != self.seq_len:
            raise ValueError(f"loader state is for split {state['split']!r} / seq_len {state['seq_len']}, "
                             f"this loader reads {self.split!r} / seq_len {self.seq_len}")
        mine = [(s["samples"], s["content_xxh64"]) for s in self.state_dict()["streams"]]
        theirs = [(s["samples"], s["content_xxh64"]) for s in state["streams"]]
        if mine != theirs:
            raise ValueError("loader state was saved over different data (stream sample counts / content hashes "
                             f"differ: {theirs} vs {mine}); exact resume is impossible")
        if state["shuffle"] != self.shuffle:
            raise ValueError(f"loader state has shuffle={state['shuffle']}, this loader shuffle={self.shuffle}")
        saved_gbs = state.get("global_batch_size")  # absent in states of older versions
        if saved_gbs is not None and saved_gbs != self.global_batch_size:
            warnings.warn(
                f"resuming with global_batch_size={self.global_batch_size} (saved with {saved_gbs}): the global "
                f"sample order is kept, but the samples of each step and the end of every epoch differ from "
                f"the original run's")
        saved_mix = [s.get("proportion") for s in state["streams"]]
        mix = [s.proportion for s in self._streams]
        if saved_mix != mix:
            warnings.warn(
                f"resuming with stream proportions {mix} (saved with {saved_mix}): the position in the epoch "
                f"is kept, but streaming draws another mixture, so the samples from here on differ from the "
                f"original run's (samples already seen this epoch may come again, others may be skipped)")
        self.close()
        self._epoch = int(state["epoch"])
        self._sample_in_epoch = int(state["sample_in_epoch"])
        self._seed = int(state["shuffle_seed"])
        self._ncn = int(state["num_canonical_nodes"])
        if state.get("initial_physical_nodes") is not None:
            self._initial_physical_nodes = int(state["initial_physical_nodes"])


def build_pretraining_loader(
    streams: Sequence[Mapping[str, Any]] | Mapping[str, Any] | str | os.PathLike,
    *,
    split: str,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    shuffle: bool = True,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    readers_per_node: int | None = None,
    group=None,
    infinite: bool | None = None,
    global_batch_size: int | None = None,
    vocab_size: int | None = None,
    num_canonical_nodes: int | None = None,
    cache_limit: int | str | None = None,
    download_timeout: float = 60.0,
    verify_shards: bool = False,
) -> PretrainingLoader:
    """Build the loader of one data-reading rank (see the module docstring).

    ``streams``: list of ``{"local": dir_or_None, "remote": uri_or_None, "proportion": float_or_None}``
    (a bare directory is accepted too). A local-only stream reads a prepared dataset in place; a
    remote (s3://, gs://, ..., or a directory used as if it were remote) is cached in ``local`` if
    given, else in ``cache_dir/<hash of remote>`` (default: a per-user temp directory). With
    proportions, streams are mixed by weight (streaming's sampling, an epoch = the sum of all
    streams' samples). ``readers_per_node`` (default ``dp_size``: one node) readers share a node;
    when more than one, their barriers need ``group``, the readers' process group (not needed when
    torch.distributed's world is exactly the readers, or in a Megatron job, where the data-parallel
    group of the reading rank is used). ``global_batch_size``: samples per optimizer step, all readers
    together (default ``micro_batch_size * dp_size``); every epoch is cut to a multiple of it, so that
    steps are the same at every layout -- give the trainer's. ``vocab_size``: also check the tokenizer
    fits the model's vocabulary. ``verify_shards``: before building, hash every shard file of the split
    present locally (a local dataset, or a remote's cache) -- a full read of the split, on every reader;
    a damaged file raises :class:`CorruptShardError` naming it (see ``integrity``).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
    if micro_batch_size < 1 or seq_len < 1:
        raise ValueError(f"micro_batch_size and seq_len must be >= 1 (got {micro_batch_size}, {seq_len})")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    global_batch_size = micro_batch_size * dp_size if global_batch_size is None else int(global_batch_size)
    if global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size * dp_size = "
                         f"{micro_batch_size * dp_size}")
    readers_per_node = dp_size if readers_per_node is None else int(readers_per_node)
    if readers_per_node < 1 or dp_size % readers_per_node:
        raise ValueError(f"dp_size={dp_size} readers cannot be spread evenly at readers_per_node={readers_per_node}")
    num_nodes = dp_size // readers_per_node
    node, local_rank = divmod(dp_rank, readers_per_node)
    infinite = (split == "train") if infinite is None else bool(infinite)

    resolved = _resolve_streams(streams, split=split, seq_len=seq_len, cache_dir=cache_dir, node=node,
                                num_nodes=num_nodes, timeout=download_timeout)
    if vocab_size is not None:
        from .manifest import check_manifest_compat

        for s in resolved:
            check_manifest_compat(s.manifest, vocab_size=vocab_size, seq_len=seq_len)
    if num_nodes > 1:
        for s in resolved:
            if s.remote is None and s.manifest.compression and not _raw_shards_present(s.local, split):
                raise ValueError(
                    f"dataset {s.local} has compressed shards and is read in place by {num_nodes} nodes: streaming "
                    f"would decompress into it from every node at once. Pass it as a remote with a node-local "
                    f"cache_dir, or prepare it with --compression none")

    if verify_shards:
        _verify_local_shards(resolved, split)
    for s in resolved:
        if stream_hash(s.manifest) is None:
            warnings.warn(f"dataset {s.remote or s.local} records no shard hashes (prepared without them): its "
                          f"shards are read unverified; prepare it again to get them", RuntimeWarning, stacklevel=2)

    from streaming import Stream

    stream_objs = [Stream(local=s.local, remote=s.remote, split=split, proportion=s.proportion,
                          validate_hash=stream_hash(s.manifest), download_timeout=download_timeout)
                   for s in resolved]
    # The val split: one canonical node, so that its global order is the storage order at any node
    # count (with one per node, each node's share starts in another part of the split and the
    # first batches of an evaluation would be other samples on another number of nodes).
    ncn = num_canonical_nodes if num_canonical_nodes is not None else (num_nodes if split == "train" else 1)
    group = _reader_group(group, dp_size=dp_size, readers_per_node=readers_per_node)
    dataset_cls = _make_dataset_class()
    warn_about_leftovers()
    with _streaming_world(rank=dp_rank, world=dp_size, local_rank=local_rank, local_world=readers_per_node,
                          node=node, group=group):
        dataset = dataset_cls(streams=stream_objs, batch_size=micro_batch_size, shuffle=shuffle,
                              shuffle_seed=seed, num_canonical_nodes=ncn, cache_limit=cache_limit,
                              partition_algo="relaxed", shuffle_algo="py1e", sampling_method="balanced",
                              batching_method="random")
    return PretrainingLoader(dataset, streams=resolved, split=split, seq_len=seq_len,
                             micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                             global_batch_size=global_batch_size, seed=seed,
                             shuffle=shuffle, num_workers=num_workers, infinite=infinite,
                             num_canonical_nodes=ncn, initial_physical_nodes=num_nodes)
