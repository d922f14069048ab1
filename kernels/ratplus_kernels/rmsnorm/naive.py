"""Pure-PyTorch reference of RMSNorm (same signature as :func:`.fused.fused_rms_norm`).

    y = x / sqrt(mean(x**2, -1) + eps) * weight

Statistics and products in fp32 whatever the input dtype; ``y`` in the input's dtype. The weight
has the size of the last dimension. Autograd gives the backward (the oracle of the fused one)."""
from __future__ import annotations

import torch


def check_rms_norm_args(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """Raise ValueError naming what breaks the contract above."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}")
    if not eps >= 0.0:
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    check_rms_norm_args(x, weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def naive_rms_norm_with_residual(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """``(naive_rms_norm(x), x)``: the norm and the input as a pre-norm block's residual branch.
    Autograd sums the two branches' gradients of ``x``; the fused version sums them in its backward."""
    return naive_rms_norm(x, weight, eps), x
