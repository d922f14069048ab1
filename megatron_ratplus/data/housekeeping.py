"""Remove what mosaicml-streaming leaves behind on a node after crashed or killed jobs.

Streaming coordinates the readers of a node through POSIX shared memory named ``NNNNNN_<what>``
(``/dev/shm`` on Linux) and lock files ``NNNNNN_barrier_filelock`` / ``NNNNNN_cache_filelock`` in
the temp directory. A process that dies without cleaning up leaves them, and the lock files are
never removed even on a clean exit; new datasets simply take the next free prefix, so leftovers
cost nothing but clutter and a slightly longer prefix scan. The loader therefore never cleans up
by itself: cleaning while any streaming job runs on the node would pull shared memory from under
it. Run ``ratplus-data clean-shm --force`` on an idle node instead.

(Streaming's own ``clean_stale_shared_memory`` stops at the first prefix without leftovers, so it
misses leftovers above a gap; this walks the whole directory.)
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_SHM_NAMES = ("locals", "barrier", "next_epoch", "cache_usage", "shard_states", "shard_access_times",
              "resume", "epoch_shape", "epoch_data")
_SHM_RE = re.compile(r"^(\d{6})_(" + "|".join(_SHM_NAMES) + r")$")
_LOCK_RE = re.compile(r"^(\d{6})_(barrier|cache)_filelock$")


def streaming_leftovers(only_prefixes: set[str] | None = None) -> tuple[list[Path], list[Path]]:
    """(shared-memory files, lock files) of streaming on this node, optionally for some prefixes."""
    def wanted(match) -> bool:
        return match is not None and (only_prefixes is None or match.group(1) in only_prefixes)

    shm = sorted(p for p in SHM_DIR.iterdir() if wanted(_SHM_RE.match(p.name))) if SHM_DIR.is_dir() else []
    tmp = Path(tempfile.gettempdir())
    locks = sorted(p for p in tmp.iterdir() if wanted(_LOCK_RE.match(p.name)))
    return shm, locks


def clean_streaming_leftovers(*, dry_run: bool = False, only_prefixes: set[str] | None = None
                              ) -> tuple[list[Path], list[Path]]:
    """Delete streaming's shared memory and lock files on this node; returns what was (or would be)
    deleted. Only safe when no streaming job is running on the node."""
    shm, locks = streaming_leftovers(only_prefixes)
    if not dry_run:
        for p in shm + locks:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    return shm, locks
