"""Where the recurrence's backward writes ``dg, dk, dv``: by default new tensors; with a
*gradient destination*, tensors the caller provides.

Why: in the RAT+ layer ``g, k, v`` are strided views of one fused projection output, and the
gradient of that output must be one tensor in the same layout. Autograd would assemble it by
stacking the blocks' gradients (a copy of the whole projection gradient: about 3.6% of a layer's
forward+backward at B=4, T=4096, d=2048). With a destination, the kernel writes straight into the
blocks' slots of that buffer and the copy disappears (megatron_ratplus.ops.projection_split).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

Grads = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
GradDestination = Callable[[], Optional[Grads]]


def claim_grad_destination(grad_destination, g, k, v):
    """``(dg, dk, dv)`` from a ``grad_destination`` provider (called once, in the backward), or
    None when there is none or it declines, or when ``g, k, v`` do not share one set of strides
    (the fused kernel stores all three through one offset tile; the provider is then not called).
    Each must match its input's shape, dtype, device and strides."""
    if grad_destination is None or not (g.stride() == k.stride() == v.stride()):
        return None
    dests = grad_destination()
    if dests is None:
        return None
    dests = tuple(dests)
    if len(dests) != 3:
        raise ValueError(f"grad_destination must return (dg, dk, dv) or None, got {len(dests)} tensors")
    for name, dst, x in zip(("dg", "dk", "dv"), dests, (g, k, v)):
        if (dst.shape != x.shape or dst.dtype != x.dtype or dst.device != x.device
                or dst.stride() != x.stride()):
            raise ValueError(
                f"grad_destination: {name} must match its input's shape, dtype, device and strides "
                f"{tuple(x.shape)}, {x.dtype}, {x.device}, {x.stride()}; got {tuple(dst.shape)}, "
                f"{dst.dtype}, {dst.device}, {dst.stride()}")
    return dests


class _RouteGrads(torch.autograd.Function):
    """Identity on ``g, k, v`` whose backward copies their gradients into the destination."""

    @staticmethod
    def forward(ctx, grad_destination, g, k, v):
        ctx.grad_destination = grad_destination
        ctx.save_for_backward(g, k, v)
        return g.view_as(g), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dg, dk, dv):
        g, k, v = ctx.saved_tensors
        dests = claim_grad_destination(ctx.grad_destination, g, k, v)
        if dests is None:
            return None, dg, dk, dv
        for dst, grad in zip(dests, (dg, dk, dv)):
            if grad is None:
                dst.zero_()
            else:
                dst.copy_(grad)
        return (None, *dests)


def route_grads_into(grad_destination: Optional[GradDestination], g, k, v):
    """``g, k, v`` unchanged, their gradients copied into ``grad_destination``'s tensors: how the
    reference implementations honour the argument the fused kernel writes into directly (same
    results, one copy more)."""
    if grad_destination is None or not torch.is_grad_enabled():
        return g, k, v
    return _RouteGrads.apply(grad_destination, g, k, v)
