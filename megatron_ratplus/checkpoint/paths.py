"""Where checkpoints live: ``<save_dir>/iter_XXXXXXX/`` directories and the ``latest`` tracker.

The tracker ``latest_checkpointed_iteration.txt`` holds the iteration of the newest checkpoint
that completed on every rank. It is replaced atomically (write a temporary file, fsync,
``os.replace``), so a reader sees either the old or the new number, never a partial write.

``.ratplus-run.lock`` is the run lock (:func:`lock_save_dir`): one run at a time per save_dir.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .. import atomic_files, file_locks
from .errors import CheckpointError

log = logging.getLogger(__name__)

TRACKER_NAME = "latest_checkpointed_iteration.txt"
LOCK_NAME = ".ratplus-run.lock"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_dir_name(step: int) -> str:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return f"iter_{step:07d}"


def iteration_of(path) -> Optional[int]:
    """The iteration encoded in an ``iter_XXXXXXX`` directory name, else None."""
    m = _ITER_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_iter_dirs(save_dir) -> List[Tuple[int, Path]]:
    """``(iteration, path)`` of every ``iter_*`` directory in ``save_dir``, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for entry in save_dir.iterdir():
        it = iteration_of(entry)
        if it is not None and entry.is_dir():
            found.append((it, entry))
    return sorted(found)


def tracker_path(save_dir) -> Path:
    return Path(save_dir) / TRACKER_NAME


def read_tracker(save_dir) -> Tuple[Optional[int], Optional[str]]:
    """``(iteration, problem)``: ``(None, None)`` when there is no tracker file, ``(None, why)``
    when it exists but cannot be read as an iteration number."""
    path = tracker_path(save_dir)
    if not path.exists():
        return None, None
    try:
        text = path.read_text().strip()
    except OSError as e:
        return None, f"{path} cannot be read: {e}"
    if not text.isdigit():
        return None, f"{path} does not hold an iteration number (content: {text[:40]!r})"
    return int(text), None


def write_tracker(save_dir, step: int) -> Path:
    """Atomically point the tracker at ``step``."""
    return atomic_files.replace_text(tracker_path(save_dir), f"{int(step)}\n", durable=True)


def looks_like_checkpoint(path) -> bool:
    """True for a directory that is (or was meant to be) one checkpoint rather than a save_dir."""
    path = Path(path)
    if iteration_of(path) is not None:
        return True
    return any((path / name).exists() for name in ("metadata.json", "common.pt", ".metadata"))


def is_save_dir(path) -> bool:
    path = Path(path)
    return tracker_path(path).exists() or bool(list_iter_dirs(path))


# --------------------------------------------------------------------------------------------
# Leftovers of killed processes
# --------------------------------------------------------------------------------------------
_LEFTOVERS = (
    (re.compile(r"^\.deleting-iter_\d{7,}-\d+$"),
     "a checkpoint whose removal by retention was interrupted: remove it"),
    (re.compile(r"^iter_\d{7,}\.incomplete-.+$"),
     "an unfinished save set aside by a later save of that iteration: inspect or remove it"),
    (re.compile(rf"^\.{re.escape(TRACKER_NAME)}\.tmp\.\d+$"),
     "a tracker update that was interrupted: remove it"),
)


def _tree_size(path: Path) -> Optional[int]:
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum(os.path.getsize(os.path.join(root, name))
                   for root, _dirs, files in os.walk(path) for name in files)
    except OSError:
        return None


def leftovers(save_dir) -> List[Tuple[Path, Optional[int], str]]:
    """``(path, size in bytes, what it is)`` of what killed processes left in ``save_dir``.

    Nothing removes them automatically (an unfinished save may be worth a look, and a deletion
    must never race another process), but they can hold a whole checkpoint's worth of disk, so
    the manager and ``ratplus-ckpt list`` report them.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for entry in sorted(save_dir.iterdir()):
        for pattern, what in _LEFTOVERS:
            if pattern.match(entry.name):
                found.append((entry, _tree_size(entry), what))
                break
    return found


def format_size(size: Optional[int]) -> str:
    if size is None:
        return "size unknown"
    if size < 2**20:
        return f"{size} bytes"
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------------
# The run lock: one run per save_dir
# --------------------------------------------------------------------------------------------
# Two runs writing into one save_dir (a Slurm requeue racing a manual resubmission, a copied
# config) would overwrite each other's checkpoints and both report success. The process that
# owns the save_dir holds an exclusive flock on LOCK_NAME (:mod:`megatron_ratplus.file_locks`: it
# ends with the process, however it dies, so a preempted or killed run never blocks its own
# requeue, and forked children do not keep it). The file is never deleted (unlinking a lock file
# lets two processes lock two different inodes).
_held_locks: Dict[str, List[int]] = {}        # realpath of save_dir -> [fd, number of users]
_unsupported_warned = False

# A forked child holds no lock (file_locks closes its descriptors): it must not count as holding one.
os.register_at_fork(after_in_child=_held_locks.clear)


def _lock_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
    if not fields.get("pid"):
        return "another process (its host and pid are not recorded yet)"
    holder = (f"pid {fields['pid']} on host {fields.get('host', '?')}, "
              f"running since {fields.get('started', '?')}")
    if fields.get("host") == socket.gethostname() and fields["pid"].isdigit():
        try:
            os.kill(int(fields["pid"]), 0)
        except ProcessLookupError:
            holder += (" (that process has exited: a process it started still holds the lock; "
                       f"'fuser -v {path}' names it)")
        except OSError:
            pass
    return holder


def lock_save_dir(save_dir) -> bool:
    """Make this process the one run using ``save_dir`` (which must exist); raises CheckpointError
    naming the holder when another process holds it.

    Re-entrant within a process (managers of one run share the lock; each call needs one
    :func:`unlock_save_dir`). Returns False, after a warning given once, on a file system
    without flock support, where runs are not protected from each other.
    """
    global _unsupported_warned
    key = os.path.realpath(save_dir)
    if key in _held_locks:
        _held_locks[key][1] += 1
        return True
    path = Path(save_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        held = file_locks.try_lock(fd)
    except OSError as e:
        os.close(fd)
        if e.errno in file_locks.UNSUPPORTED_ERRNOS:
            if not _unsupported_warned:
                _unsupported_warned = True
                log.warning("the file system of %s does not support flock (%s): nothing stops a second run "
                            "from using this save_dir at the same time", save_dir, e)
            return False
        raise
    if not held:
        os.close(fd)
        raise CheckpointError(
            f"checkpoint.save_dir={save_dir} is in use by another run ({_lock_holder(path)}): two runs "
            f"in one save_dir would overwrite each other's checkpoints. Wait for it to end, stop it, or "
            f"choose another checkpoint.save_dir")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host={socket.gethostname()} pid={os.getpid()} started={started}\n".encode(), 0)
    _held_locks[key] = [fd, 1]
    return True


def unlock_save_dir(save_dir) -> None:
    """Give back one :func:`lock_save_dir`; the last one releases the lock."""
    entry = _held_locks.get(os.path.realpath(save_dir))
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _held_locks[os.path.realpath(save_dir)]
        file_locks.release(entry[0])       # closing the only descriptor releases the flock


def holds_save_dir_lock(save_dir) -> bool:
    return os.path.realpath(save_dir) in _held_locks
