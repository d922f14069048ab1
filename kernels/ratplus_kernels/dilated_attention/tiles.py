"""Triton building blocks shared by the dilated-attention kernels (:mod:`.forward_kernels`,
:mod:`.backward_kernels`): the compact numbering of the global keys (initial keys, then chunk ends
at stride ``D``), row-tile loads (masked pointer loads, or TMA boxes), the fp32-accumulating
product and the online-softmax step. The partition of the allowed pairs they implement is
described in :mod:`.fused`.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _n_global(x_hi, P, D, CMIN):
    """Number of global keys with index ``<= x_hi`` (``x_hi`` may be negative)."""
    c = tl.maximum(x_hi + 1, 0)
    return tl.minimum(c, P) + tl.maximum(c // D - CMIN, 0)


@triton.jit
def _global_key(g, P, D, CMIN, NS):
    """Token index of compact global key ``g`` (a vector). ``NS`` = number of chunk-end keys;
    the chunk-end ordinal is clamped so that out-of-range lanes stay small (they are masked)."""
    gs = tl.minimum(tl.maximum(g - P, 0), NS)
    return tl.where(g < P, g, (gs + CMIN + 1) * D - 1)


@triton.jit
def _row_mask(rm, dmask, EVEN_D: tl.constexpr):
    if EVEN_D:
        return rm[:, None]
    else:
        return rm[:, None] & dmask[None, :]


@triton.jit
def _load_rows(base, rows, stride_t, rm, d, dmask, EVEN_D: tl.constexpr):
    ptr = base + rows[:, None].to(tl.int64) * stride_t + d[None, :]
    return tl.load(ptr, mask=_row_mask(rm, dmask, EVEN_D), other=0.0)


@triton.jit
def _device_tile(base, T, stride_t, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """In-kernel TMA descriptor of the ``[T, stride_t]`` view of a ``[T, B, H, Dh]`` tensor
    (``TMA == 2``; the host checked that its rows do not overlap, so ``stride_t`` columns cover
    every (batch, head)): built by each program, no host-side encoding per launch."""
    return tl.make_tensor_descriptor(base, [T, stride_t], [stride_t, 1], [ROWS, HEAD_DIM])


@triton.jit
def _row_tile(desc, base, row0, col, rows, stride_t, rmask, d, dmask, EVEN_D: tl.constexpr,
              TMA: tl.constexpr):
    """The ``[ROWS, BLOCK_D]`` tile of the contiguous rows ``rows = row0 + arange(ROWS)`` of one
    (batch, head), the one place that chooses between the two ways of reading a row tile.

    TMA: one box of the descriptor ``desc`` (encoded on the host, or :func:`_device_tile` when
    ``TMA == 2``) at ``[row0, col]`` of the ``[T, columns]`` view, ``col`` being the first column
    of the (batch, head): an asynchronous load with no address registers, which the software
    pipeliner can prefetch. The box (``ROWS`` x ``HEAD_DIM``, a power of two, so ``EVEN_D``) is
    fixed by the descriptor and cannot be masked: rows past T read as zeros, and rows past a
    shorter bound (``rmask``) are real data that the caller masks out of its scores.
    Otherwise: a pointer load of ``rows`` from ``base`` (the first element of the (batch, head))
    at row stride ``stride_t``, masked by ``rmask`` (and ``dmask`` unless ``EVEN_D``), zeros
    elsewhere; ``desc`` and ``col`` are then unused (so the masks matter on this path only).
    Gathered rows (the global keys) are not contiguous: they stay :func:`_load_rows`."""
    if TMA:
        return desc.load([row0, col])
    else:
        return _load_rows(base, rows, stride_t, rmask, d, dmask, EVEN_D)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation. UPCAST (interpreter with bf16 only, whose bf16 dot is
    wrong in Triton 3.8's interpreter) multiplies the exactly-upcast operands instead."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _online_update(s, allowed, vv, m_i, l_i, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, PREC, UPCAST)
    return m_new, l_i, acc
