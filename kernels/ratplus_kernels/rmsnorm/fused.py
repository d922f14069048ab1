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

:func:`fused_rms_norm_with_residual` also returns the input as the residual branch of a pre-norm
block (``x + f(norm(x))``). Autograd would sum the two gradients of ``x`` (the norm's and the
residual's) in a separate elementwise kernel, which reads both and writes the sum; here the
backward pass reads the residual's gradient beside ``dy`` and writes the sum itself, saving two of
the three passes over the activation (docs/benchmarks.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import interpreting
from .naive import check_rms_norm_args

MAX_COLUMNS = 8192                      # a row lives in registers: 16 fp32 per thread and tensor at 16 warps
BACKWARD_PROGRAMS_PER_SM = 4
# The backward's row loop: rows per iteration and software-pipelining depth (the next rows' loads
# issued while this one computes). H100 sweep, forward + backward ms with the residual's gradient /
# without, 1 row and depth 1 against depth 3: [4096, 2, 2048] 0.1058 -> 0.0969 / 0.0860 -> 0.0836;
# [4096, 4, 2048] 0.1787 -> 0.1659 / 0.1421 -> 0.1410; [4096, 2, 2560] 0.1372 -> 0.1204 / 0.1171 ->
# 0.1072. Depth 2 and 2 or 4 rows per iteration were slower at some widths (docs/benchmarks.md).
BACKWARD_ROWS_PER_ITER = 1
BACKWARD_LOOP_STAGES = 3
PIPELINE_SHARED_BYTES = 80 * 1024       # shared memory the prefetched rows may take (fits GPUs with 99 KB)


def _loop_stages(block: int, rows: int, tensors: int, element_bytes: int) -> int:
    """The pipelining depth for the backward's row loop: ``BACKWARD_LOOP_STAGES``, reduced until
    the prefetched row tiles (``tensors`` inputs of ``rows x block`` elements per stage) fit
    ``PIPELINE_SHARED_BYTES`` (wide fp32 rows would otherwise exceed the GPU's shared memory)."""
    stages = BACKWARD_LOOP_STAGES
    while stages > 1 and stages * tensors * rows * block * element_bytes > PIPELINE_SHARED_BYTES:
        stages -= 1
    return stages


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
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DRES, DX, DW_PARTIAL, n_rows, N, rows_per_program,
                         BLOCK_N: tl.constexpr, HAS_DRES: tl.constexpr, ROWS: tl.constexpr,
                         LOOP_STAGES: tl.constexpr):
    """``ROWS`` rows per iteration (more loads in flight per program); ``LOOP_STAGES`` > 1 lets
    Triton prefetch the next iterations' rows while this one computes."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    count = tl.minimum(rows_per_program, n_rows - start)
    first = start * N                                     # 64-bit: long sequences pass 2**31 elements
    for r0 in tl.range(0, count, ROWS, num_stages=LOOP_STAGES):
        r = r0 + tl.arange(0, ROWS)
        rm = r < count
        offs = first + r[:, None] * N + cols[None, :]
        m2 = rm[:, None] & mask[None, :]
        x = tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=m2, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + start + r, mask=rm, other=0.0)
        x_hat = x * rstd[:, None]
        w_dy = w[None, :] * dy
        # d/dx of x * rstd(x): rstd * (w*dy - x_hat * mean(x_hat * w*dy))
        dx = (w_dy - x_hat * (tl.sum(x_hat * w_dy, axis=1) / N)[:, None]) * rstd[:, None]
        if HAS_DRES:                                      # the residual branch's gradient of x
            dx += tl.load(DRES + offs, mask=m2, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=m2)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)


def _backward_programs(n_rows: int, device: torch.device) -> int:
    sms = 4 if interpreting() or device.type != "cuda" else \
        torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_rows, sms * BACKWARD_PROGRAMS_PER_SM))


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """y and the per-row rstd; also the contiguous rows and weight that the backward reads."""
    n = x.shape[-1]
    rows = x.reshape(-1, n).contiguous()
    w = weight.contiguous()
    y = torch.empty_like(rows)
    rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n)
    if rows.shape[0]:
        _rms_norm_fwd_kernel[(rows.shape[0],)](rows, w, y, rstd, n, eps, BLOCK_N=block, num_warps=_num_warps(block))
    return y.view(x.shape), rows, w, rstd


def _backward(ctx, dy: torch.Tensor, dres):
    """dx (plus ``dres``, the residual branch's gradient, when given) and the weight gradient."""
    rows, w, rstd = ctx.saved_tensors
    n_rows, n = rows.shape
    dy_rows = dy.reshape(-1, n).contiguous()
    dres_rows = None if dres is None else dres.reshape(-1, n).contiguous()
    dx = torch.empty_like(rows)
    programs = _backward_programs(n_rows, rows.device)
    partial = torch.empty((programs, n), dtype=torch.float32, device=rows.device)
    block = triton.next_power_of_2(n)
    if n_rows:
        _rms_norm_bwd_kernel[(programs,)](dy_rows, rows, w, rstd, dy_rows if dres_rows is None else dres_rows, dx,
                                          partial, n_rows, n, triton.cdiv(n_rows, programs), BLOCK_N=block,
                                          HAS_DRES=dres_rows is not None, ROWS=BACKWARD_ROWS_PER_ITER,
                                          LOOP_STAGES=_loop_stages(block, BACKWARD_ROWS_PER_ITER,
                                                                   2 if dres_rows is None else 3, rows.element_size()),
                                          num_warps=_num_warps(block))
        dw = partial.sum(0)
    else:
        dw = torch.zeros(n, dtype=torch.float32, device=rows.device)
    return dx.view(ctx.x_shape), (dw.to(w.dtype) if ctx.needs_input_grad[1] else None)


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rows, w, rstd = _forward(x, weight, eps)
        ctx.save_for_backward(rows, w, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return *_backward(ctx, dy, None), None


class _FusedRMSNormWithResidual(torch.autograd.Function):
    """Outputs ``(norm(x), x)``; the second is a view of the input whose gradient the backward adds
    to the norm's input gradient in the same pass (None when the residual was not used)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        y, rows, w, rstd = _forward(x, weight, eps)
        ctx.save_for_backward(rows, w, rstd)
        ctx.x_shape = x.shape
        return y, x.view_as(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor, dres):
        return *_backward(ctx, dy, dres), None


def _check_fused_args(x: torch.Tensor, weight: torch.Tensor, eps: float, name: str) -> None:
    check_rms_norm_args(x, weight, eps)
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1); use naive_rms_norm on CPU")
    if x.shape[-1] > MAX_COLUMNS:
        raise ValueError(f"{name}: rows of {x.shape[-1]} elements exceed the kernel's {MAX_COLUMNS} "
                         "(a row is held in registers); use the reference")


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`.naive.naive_rms_norm` in one Triton kernel each way (autograd-aware)."""
    _check_fused_args(x, weight, eps, "fused_rms_norm")
    return _FusedRMSNorm.apply(x, weight, float(eps))


def fused_rms_norm_with_residual(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """:func:`.naive.naive_rms_norm_with_residual`: ``(norm(x), residual)`` where ``residual`` is
    ``x`` for the block's skip connection, its gradient summed into ``x``'s by the norm's backward."""
    _check_fused_args(x, weight, eps, "fused_rms_norm_with_residual")
    return _FusedRMSNormWithResidual.apply(x, weight, float(eps))
