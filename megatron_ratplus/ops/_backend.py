"""Backend selection shared by the ops: which implementation serves a call."""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

BACKENDS = ("auto", "fused", "reference")


def load_fused(module: str, name: str) -> Optional[Callable]:
    """The fused kernel ``ratplus_kernels.<module>.<name>``, or None when it cannot be imported
    (no triton, or the kernel is not built into this installation)."""
    try:
        return getattr(importlib.import_module(f"ratplus_kernels.{module}"), name)
    except (ImportError, AttributeError):
        return None


def use_fused(backend: str, tensor: torch.Tensor, fused: Optional[Callable], op: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    if backend == "fused":
        if fused is None:
            raise RuntimeError(f"{op}: backend='fused' requested but the Triton kernel is unavailable "
                               f"(is triton installed?)")
        return True
    return fused is not None and tensor.is_cuda
