"""Remove what mosaicml-streaming leaves behind on a node after crashed or killed jobs.

Streaming coordinates the readers of a node through POSIX shared memory named ``NNNNNN_<what>``
(``/dev/shm`` on Linux) and lock files ``NNNNNN_barrier_filelock`` / ``NNNNNN_cache_filelock`` in
the temp directory. A process that dies without cleaning up leaves them, and the lock files are
never removed even on a clean exit; new datasets take the next free prefix. Leftover shared memory
is not free, though: streaming (0.13) opens every existing prefix's shared memory while it scans
for a free one and never closes it, so each new dataset costs one file descriptor per leftover
prefix. On a node with a few hundred leftovers a process that builds many datasets (a test suite,
a sweep) runs out of descriptors ("Too many open files"). The loader therefore warns when many
prefixes exist (:func:`warn_about_leftovers`) but never cleans up by itself: cleaning while any
streaming job runs on the node would pull shared memory from under it. Run
``ratplus-data clean-shm --force`` on an idle node instead.

(Streaming's own ``clean_stale_shared_memory`` stops at the first prefix without leftovers, so it
misses leftovers above a gap; this walks the whole directory.)
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_SHM_NAMES = ("locals", "barrier", "next_epoch", "cache_usage", "shard_states", "shard_access_times",
              "resume", "epoch_shape", "epoch_data")
_SHM_RE = re.compile(r"^(\d{6})_(" + "|".join(_SHM_NAMES) + r")$")
_LOCK_RE = re.compile(r"^(\d{6})_(barrier|cache)_filelock$")


def _shm_files() -> list[tuple[Path, re.Match]]:
    """(path, name match) of streaming's shared-memory files on this node, sorted by name."""
    if not SHM_DIR.is_dir():
        return []
    return [(p, m) for p in sorted(SHM_DIR.iterdir()) if (m := _SHM_RE.match(p.name))]


def streaming_leftovers(only_prefixes: set[str] | None = None) -> tuple[list[Path], list[Path]]:
    """(shared-memory files, lock files) of streaming on this node, optionally for some prefixes."""
    def wanted(match) -> bool:
        return match is not None and (only_prefixes is None or match.group(1) in only_prefixes)

    shm = [p for p, m in _shm_files() if wanted(m)]
    tmp = Path(tempfile.gettempdir())
    locks = sorted(p for p in tmp.iterdir() if wanted(_LOCK_RE.match(p.name)))
    return shm, locks


def _registered_locals(data: bytes, *, released_too: bool = False) -> list[str]:
    """The local directories in streaming's ``NNNNNN_locals`` record: an int32 byte count (the
    count included), then the directories and the prefix number, NUL-separated. ``released_too``:
    also read a record whose count streaming zeroed on the way out (the text stays behind it)."""
    size = int.from_bytes(data[:4], "little", signed=True)
    if size == 0 and released_too:
        size = len(data)
    return data[4:size].decode("utf-8", errors="replace").split("\0")[:-1]


def _locals_records():
    """(prefix, bytes) of every streaming ``NNNNNN_locals`` record on this node that can be read."""
    for p, m in _shm_files():
        if m.group(2) != "locals":
            continue
        try:
            yield m.group(1), p.read_bytes()
        except OSError:
            continue


def prefixes_reading(directory: str | os.PathLike) -> set[str]:
    """Prefixes whose registered local directories (streaming's ``NNNNNN_locals``) lie under
    ``directory``: the shared memory of datasets read from there, e.g. a finished test session's."""
    root = Path(os.path.abspath(directory))
    return {prefix for prefix, data in _locals_records()
            if any(Path(d).is_relative_to(root) for d in _registered_locals(data) if d)}


def prefixes_of_removed_directories(root: str | os.PathLike) -> set[str]:
    """Prefixes that read only from directories under ``root`` that no longer exist: certainly dead
    (nothing can read a deleted dataset), e.g. those of a killed test session whose temporary
    directory is gone, so safe to clean while other streaming jobs run. The record is read whole,
    also where streaming already zeroed its byte count on the way out (a process killed then)."""
    root = Path(os.path.abspath(root))
    dead = set()
    for prefix, data in _locals_records():
        named = [d for d in _registered_locals(data, released_too=True) if d.startswith("/")]
        if named and all(Path(d).is_relative_to(root) and not Path(d).exists() for d in named):
            dead.add(prefix)
    return dead


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


# Shared-memory prefixes on the node above which building a dataset warns (a node's own live jobs
# hold a few each: one per dataset of every process).
MANY_PREFIXES = 64


def warn_about_leftovers(threshold: int | None = None) -> int:
    """Number of streaming shared-memory prefixes on this node; warns when it exceeds
    ``threshold`` (default :data:`MANY_PREFIXES`; see the module docstring: each costs every new
    dataset a file descriptor)."""
    threshold = MANY_PREFIXES if threshold is None else threshold
    prefixes = {m.group(1) for _, m in _shm_files()}
    if len(prefixes) > threshold:
        warnings.warn(f"{len(prefixes)} prefixes of mosaicml-streaming shared memory in {SHM_DIR}, most likely "
                      f"left by crashed or killed jobs; streaming keeps one file descriptor open per prefix "
                      f"for every dataset it builds, so a process may run out of them. When no streaming "
                      f"job runs on this node: ratplus-data clean-shm --force", RuntimeWarning, stacklevel=3)
    return len(prefixes)
