"""Keep-last-N retention of complete checkpoints.

Rules: the checkpoint just saved is always kept and counts as one of the N; only *complete*
checkpoints *older* than it are candidates; incomplete directories (a save that died, kept for
inspection) and checkpoints of a later iteration (another timeline in the same save_dir) are
never touched. A checkpoint is renamed to a hidden name before it is removed, so a deletion that
is interrupted never leaves a half-deleted ``iter_*`` directory that looks like a checkpoint.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import List, Optional

from .paths import list_iter_dirs
from .validate import checkpoint_problems

log = logging.getLogger(__name__)


def select_for_deletion(save_dir, current_step: int, keep_last: Optional[int]) -> List[Path]:
    if not keep_last:
        return []
    older_complete = [path for it, path in reversed(list_iter_dirs(save_dir))
                      if it < current_step and not checkpoint_problems(path)]
    return older_complete[max(keep_last - 1, 0):]


def apply_retention(save_dir, current_step: int, keep_last: Optional[int]) -> List[Path]:
    """Delete what :func:`select_for_deletion` picks; returns the deleted paths."""
    deleted = []
    for path in select_for_deletion(save_dir, current_step, keep_last):
        doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}")
        try:
            os.rename(path, doomed)
            shutil.rmtree(doomed)
        except OSError as e:
            log.warning("checkpoint retention: could not remove %s: %s", path, e)
            continue
        deleted.append(path)
    return deleted
