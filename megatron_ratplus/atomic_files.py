"""Replace a small file whole (write a sibling temporary file, then ``os.replace``).

A reader, or the next start after a crash, then sees the old content or the new, never a part:
this is what the checkpoint tracker, dataset manifests, ownership records and the truncated
metrics log rely on. The temporary file is ``.<name>.tmp.<pid>`` beside the target (same file
system, so the rename is atomic); a kill between the write and the rename leaves only that file,
which :func:`megatron_ratplus.checkpoint.paths.leftovers` names for the tracker.
"""
from __future__ import annotations

import os
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """The temporary file :func:`replace_text` writes before renaming it onto ``path``."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems refuse directory fsync)."""
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


def replace_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """Atomically make ``text`` the content of ``path`` (UTF-8); return ``path``.

    ``durable`` also fsyncs the data and the directory, for files a restart after a power loss
    must still find (the checkpoint tracker). The file gets the umask's permissions, as a plain
    ``open`` would, so group members of a shared project directory can read it.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)
    return path
