"""Where checkpoints live: ``<save_dir>/iter_XXXXXXX/`` directories and the ``latest`` tracker.

The tracker ``latest_checkpointed_iteration.txt`` holds the iteration of the newest checkpoint
that completed on every rank. It is replaced atomically (write a temporary file, fsync,
``os.replace``), so a reader sees either the old or the new number, never a partial write.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import CheckpointError

TRACKER_NAME = "latest_checkpointed_iteration.txt"
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_tracker(save_dir, step: int) -> Path:
    """Atomically point the tracker at ``step``."""
    save_dir = Path(save_dir)
    final = tracker_path(save_dir)
    tmp = save_dir / f".{TRACKER_NAME}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{int(step)}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(save_dir)
    return final


def looks_like_checkpoint(path) -> bool:
    """True for a directory that is (or was meant to be) one checkpoint rather than a save_dir."""
    path = Path(path)
    if iteration_of(path) is not None:
        return True
    return any((path / name).exists() for name in ("metadata.json", "common.pt", ".metadata"))


def is_save_dir(path) -> bool:
    path = Path(path)
    return tracker_path(path).exists() or bool(list_iter_dirs(path))
