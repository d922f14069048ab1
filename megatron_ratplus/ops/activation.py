"""The MLP's activation with backend dispatch.

The paper's model uses the exact GELU. CUDA tensors use the Triton kernels of
``ratplus_kernels.activation`` (torch's CUDA GELU kernels run well under the device's bandwidth at
the MLP's shape; docs/benchmarks.md); ``backend="reference"``, CPU tensors and a missing Triton use
torch's ``F.gelu``, which computes the same function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import load_fused, use_fused

_FUSED = load_fused("activation", "fused_gelu")


def gelu(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``0.5 * x * (1 + erf(x / sqrt(2)))`` with fp32 math, in ``x``'s dtype."""
    if use_fused(backend, x, _FUSED, "gelu"):
        return _FUSED(x)
    return F.gelu(x)


class Gelu:
    """``gelu`` bound to a kernel backend: the one-argument ``activation_func`` Megatron's MLP
    calls. A class rather than a closure so the config stays picklable and prints its backend."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, self.backend)

    def __eq__(self, other) -> bool:
        return isinstance(other, Gelu) and other.backend == self.backend

    def __hash__(self) -> int:
        return hash((Gelu, self.backend))

    def __repr__(self) -> str:
        return f"Gelu(backend={self.backend!r})"
