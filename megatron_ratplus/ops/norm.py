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
_FUSED_WITH_RESIDUAL = load_fused("rmsnorm", "fused_rms_norm_with_residual")
_MAX_FUSED_COLUMNS = load_fused("rmsnorm.fused", "MAX_COLUMNS") or 0   # widest row the kernel holds


def _fused_serves(backend: str, x: torch.Tensor, fused, op: str) -> bool:
    return use_fused(backend, x, fused, op) and (backend == "fused" or x.shape[-1] <= _MAX_FUSED_COLUMNS)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` with fp32 statistics, in ``x``'s dtype."""
    if _fused_serves(backend, x, _FUSED, "rms_norm"):
        return _FUSED(x, weight, eps)
    if x.is_cuda:
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps=eps)
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm_with_residual(x: torch.Tensor, weight: torch.Tensor, eps: float,
                           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x), residual)`` for a pre-norm block ``residual + f(norm(x))``: ``residual`` is
    ``x`` itself, or, where the Triton kernels serve the call, a view of ``x`` whose gradient the
    norm's backward adds into ``x``'s in its own pass (no separate accumulation kernel)."""
    if _fused_serves(backend, x, _FUSED_WITH_RESIDUAL, "rms_norm_with_residual"):
        return _FUSED_WITH_RESIDUAL(x, weight, eps)
    return rms_norm(x, weight, eps, backend), x
