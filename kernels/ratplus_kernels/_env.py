"""Where the kernels run: Triton's CPU interpreter or a GPU."""
from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is on (kernels then run on CPU tensors through Triton's
    interpreter; it must be set before the kernel modules are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
