"""Pure-PyTorch reference of the exact GELU (same signature as :func:`.fused.fused_gelu`).

    gelu(x) = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))

The math runs in fp32 whatever the input dtype, the result is in the input's dtype: what torch's
``F.gelu`` (``approximate="none"``) computes, which the MLP of the paper's model uses. Autograd
gives the backward (the oracle of the fused one)."""
from __future__ import annotations

import torch


def check_gelu_args(x: torch.Tensor) -> None:
    """Raise ValueError naming what breaks the contract above."""
    if not x.is_floating_point():
        raise ValueError(f"gelu: x must be a floating-point tensor, got {x.dtype}")


def naive_gelu(x: torch.Tensor) -> torch.Tensor:
    check_gelu_args(x)
    xf = x.float()
    return (0.5 * xf * (1.0 + torch.erf(xf * 0.7071067811865476))).to(x.dtype)
