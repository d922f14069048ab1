"""RMSNorm with backend dispatch (the model's input and pre-MLP norms and the final norm).

CUDA tensors use the Triton kernels of ``ratplus_kernels.rmsnorm`` (one backward pass that also
produces the weight gradient, where torch's CUDA ``rms_norm`` runs a second kernel that reads x and
dy again; docs/benchmarks.md). ``backend="reference"`` on CUDA, and rows wider than the kernel holds
in registers, keep torch's fused ``F.rms_norm``. On CPU the input is upcast explicitly so bf16 runs
keep fp32 statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import load_fused, use_fused

_FUSED = load_fused("rmsnorm", "fused_rms_norm")
_MAX_FUSED_COLUMNS = load_fused("rmsnorm.fused", "MAX_COLUMNS") or 0   # widest row the kernel holds


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` with fp32 statistics, in ``x``'s dtype."""
    if use_fused(backend, x, _FUSED, "rms_norm") and (backend == "fused" or x.shape[-1] <= _MAX_FUSED_COLUMNS):
        return _FUSED(x, weight, eps)
    if x.is_cuda:
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps=eps)
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * weight.float()).to(x.dtype)
