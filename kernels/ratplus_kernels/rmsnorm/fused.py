"""Triton RMSNorm, forward and backward (contract and reference in :mod:`.naive`).

Why: torch's CUDA ``rms_norm`` backward is two kernels, one for the input gradient and one for the
weight gradient (``GammaBetaBackward``), and each reads ``x`` and ``dy`` again. For the 1.5B model
(49 norms of 8192 x 2048 bf16 rows per pass) the two took 3.5 ms of a ~171 ms step on an H200,
the weight-gradient one at well under the device's bandwidth. Here one backward pass reads ``x``,
``dy`` and the saved per-row ``rstd`` once and writes ``dx``, while each program also accumulates
its rows' share of the weight gradient in fp32 registers; a sum over the programs' partial rows
(a few MB) finishes it.

Layout: rows of the last dimension, contiguous; one row per forward program, a contiguous range of
rows per backward program (a few programs per SM, so the partial weight gradients stay small).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import interpreting
from .naive import check_rms_norm_args

MAX_COLUMNS = 8192                      # a row lives in registers: 16 fp32 per thread and tensor at 16 warps
BACKWARD_PROGRAMS_PER_SM = 4


def _num_warps(block: int) -> int:
    """16 elements per thread up to 16 warps. H200 sweep, forward + backward ms at [4096, 2, d] bf16,
    4 / 8 / 16 warps: d=2048 0.071 / 0.071 / 0.078; 2560 0.102 / 0.102 / 0.108; 4096 0.126 / 0.126 / 0.129
    (16 warps was the first choice; forward alone the gap is wider, e.g. 0.022 against 0.030 ms)."""
    return min(max(block // 512, 1), 16)


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * N + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, N, rows_per_program, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    first = start * N                                     # 64-bit: long sequences pass 2**31 elements
    for r in range(0, tl.minimum(rows_per_program, n_rows - start)):
        offs = first + r * N + cols
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + start + r)
        x_hat = x * rstd
        w_dy = w * dy
        # d/dx of x * rstd(x): rstd * (w*dy - x_hat * mean(x_hat * w*dy))
        dx = (w_dy - x_hat * (tl.sum(x_hat * w_dy, axis=0) / N)) * rstd
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)


def _backward_programs(n_rows: int, device: torch.device) -> int:
    sms = 4 if interpreting() or device.type != "cuda" else \
        torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_rows, sms * BACKWARD_PROGRAMS_PER_SM))


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        rows = x.reshape(-1, n).contiguous()
        w = weight.contiguous()
        y = torch.empty_like(rows)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        if rows.shape[0]:
            _rms_norm_fwd_kernel[(rows.shape[0],)](rows, w, y, rstd, n, eps, BLOCK_N=block,
                                                   num_warps=_num_warps(block))
        ctx.save_for_backward(rows, w, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, w, rstd = ctx.saved_tensors
        n_rows, n = rows.shape
        dy_rows = dy.reshape(-1, n).contiguous()
        dx = torch.empty_like(rows)
        programs = _backward_programs(n_rows, rows.device)
        partial = torch.empty((programs, n), dtype=torch.float32, device=rows.device)
        block = triton.next_power_of_2(n)
        if n_rows:
            _rms_norm_bwd_kernel[(programs,)](dy_rows, rows, w, rstd, dx, partial, n_rows, n,
                                              triton.cdiv(n_rows, programs), BLOCK_N=block,
                                              num_warps=_num_warps(block))
            dw = partial.sum(0)
        else:
            dw = torch.zeros(n, dtype=torch.float32, device=rows.device)
        return dx.view(ctx.x_shape), (dw.to(w.dtype) if ctx.needs_input_grad[1] else None), None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`.naive.naive_rms_norm` in one Triton kernel each way (autograd-aware)."""
    check_rms_norm_args(x, weight, eps)
    if x.shape[-1] > MAX_COLUMNS:
        raise ValueError(f"fused_rms_norm: rows of {x.shape[-1]} elements exceed the kernel's {MAX_COLUMNS} "
                         "(a row is held in registers); use the reference")
    return _FusedRMSNorm.apply(x, weight, float(eps))
