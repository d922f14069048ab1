"""Triton exact GELU, forward and backward (contract and reference in :mod:`.naive`).

Why: the MLP's activation is a pure bandwidth op on the largest activation of the layer (fc1's
output, ``[s, b, 4d]``: 134 MB per call for the 1.5B model at 2 x 4096 tokens). On an H200 torch's
kernels ran it at about 2.8 TB/s forward and 3.0 TB/s backward (5.5 ms of a ~170 ms step,
docs/benchmarks.md); the erf and exp of each element cost about as much issue time as its bytes
take to move, and these kernels give each thread more independent elements to hide one behind the
other.

Layout: the flattened contiguous tensor, ``BLOCK`` elements per program. Math in fp32; the
forward saves nothing new (the backward reads ``x``, as torch's does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import check_gelu_args

BLOCK = 4096
NUM_WARPS = 8
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu_fwd_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = 0.5 * x * (1.0 + tl.erf(x * _SQRT1_2))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(DY, X, DX, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(x * _SQRT1_2))
    pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    tl.store(DX + offs, (dy * (cdf + x * pdf)).to(DX.dtype.element_ty), mask=mask)


def _launch(kernel, n: int, *tensors: torch.Tensor) -> None:
    if n:
        kernel[(triton.cdiv(n, BLOCK),)](*tensors, n, BLOCK=BLOCK, num_warps=NUM_WARPS)


class _FusedGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        _launch(_gelu_fwd_kernel, x.numel(), x, y)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        _launch(_gelu_bwd_kernel, x.numel(), dy, x, dx)
        return dx


def fused_gelu(x: torch.Tensor) -> torch.Tensor:
    """:func:`.naive.naive_gelu` in one Triton kernel each way (autograd-aware)."""
    check_gelu_args(x)
    return _FusedGelu.apply(x)
