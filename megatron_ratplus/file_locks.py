"""Exclusive flock locks that end with the process holding them (stdlib only).

Used for the checkpoint run lock (one run per save_dir) and the dataset preparation lock (one
``prepare`` per output directory). The kernel drops an flock when the last descriptor of its open
file is closed, however the process dies, so a killed holder never blocks its successor. A forked
child (a data-loader or tokenizer worker, the checkpoint writer) inherits the descriptor and would
keep the lock alive after its parent died: children close their copies at fork (that does not
unlock the parent's).
"""
from __future__ import annotations

import errno
import fcntl
import os

# flock fails with these where the file system does not support it (some NFS and Lustre mounts).
UNSUPPORTED_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
_held_fds: set[int] = set()


def try_lock(fd: int) -> bool:
    """Lock the open file ``fd`` exclusively, without waiting: True once held (until :func:`release`),
    False when another process holds it. An OSError means the file system refused the lock
    (:data:`UNSUPPORTED_ERRNOS`: no flock there)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:        # EWOULDBLOCK / EAGAIN: held elsewhere
        return False
    _held_fds.add(fd)
    return True


def release(fd: int) -> None:
    """Close ``fd``; when it held a lock taken by :func:`try_lock`, that releases it."""
    _held_fds.discard(fd)
    os.close(fd)


def _close_in_child() -> None:
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)
