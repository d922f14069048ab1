"""Child processes that do not outlive the process that started them (stdlib only: imported by the
tokenizer workers, which must start fast). Used by data-loader and tokenizer workers and by the
checkpoint writer's helper process."""
from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    A parent killed by SIGKILL, or by a SIGTERM it does not handle, runs no clean-up, and its pool
    or DataLoader workers would wait for work forever, reparented to init (hundreds of MB each).
    ``parent_pid``: if the parent already died before this call, exit now (the signal would never
    come).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
