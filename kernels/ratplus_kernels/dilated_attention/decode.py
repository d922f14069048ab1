"""Decoding attention of one new query over the compact RAT+ sparse KV cache.

During generation the sparse cache of a layer holds the ``P`` initial tokens, the last ``W + 1``
tokens and one entry per completed ``D``-chunk (DESIGN.md §1): every cached key is allowed for the
new token, so decoding is plain (unmasked) attention of ``q [B, H, Dh]`` over ``N`` cached entries
``[B, H, N, Dh]``, with ``N = P + W + 1 + T / D`` (about 4 + 257 + T/16 for the adaptation preset).

``triton_decode_attention`` is a split-K ("flash-decoding") Triton kernel: with a single query per
(batch, head) a kernel that gives one program to each (batch, head) keeps at most ``B * H``
programs busy (16 at B=1, H=16, on 132 SMs) while each streams ``2 N Dh`` values serially, so the
keys are cut into ``S`` contiguous splits processed in parallel (dot products on the CUDA cores:
one query row gives the tensor cores nothing to do), each writing an fp32 partial
``(max, sum, acc)``; a second tiny kernel merges the ``S`` partials. With ``S = 1`` the first kernel
normalises and writes the output itself.

``decode_attention`` is the entry point used by generation. It calls PyTorch SDPA, because SDPA
(its flash backend splits the keys itself) was faster than this kernel at every realistic shape
measured on an H100 (2026-11-23, ``tools/bench/bench_dilated_attention.py``, bf16, H=16,
Dh=128, N = 4 + 257 + T/16, CUDA-graph replay, best of 12 launch configurations of the kernel):

    B=1,  T=64K (N=4357):  SDPA 12.4 us, Triton split-K 17.9 us
    B=4,  T=16K (N=1285):  SDPA 14.7 us, Triton split-K 21.7 us
    B=16, T=64K (N=4357):  SDPA 190.5 us (3.0 TB/s), Triton split-K 240.6 us

Those SDPA timings let PyTorch choose the backend, with a fixed ``N`` under CUDA-graph replay. In real
generation ``N`` grows by one entry per step and cuDNN attention (one of PyTorch's choices on the H100)
builds a new execution plan for every new length, so ``decode_attention`` leaves cuDNN out on CUDA
(``DECODE_SDPA_BACKENDS``); the fixed-``N`` comparison with the kernel was not rerun with that restriction.

The kernel stays available (``triton_decode_attention``), tested against SDPA, and benchmarked.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._env import interpreting as _interpreting

__all__ = ["decode_attention", "triton_decode_attention"]

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q, K, V, OUT, PACC, PML,
    sqb, sqh, skb, skh, skn, svb, svh, svn, sob, soh,
    H, N, SPLIT_LEN, NSPLIT, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BN: tl.constexpr, SINGLE: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + d, mask=dmask, other=0.0).to(tl.float32) * qk_scale
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.max(tl.full([BN], float("-inf"), tl.float32), 0)       # fp32 scalars (loop-carried)
    l_i = tl.sum(tl.zeros([BN], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    start = sp * SPLIT_LEN
    stop = tl.minimum(start + SPLIT_LEN, N)
    for n0 in range(start, stop, BN):
        n = n0 + tl.arange(0, BN)
        nm = n < stop
        off = n[:, None].to(tl.int64)
        msk = nm[:, None] & dmask[None, :]
        kk = tl.load(k_base + off * skn + d[None, :], mask=msk, other=0.0).to(tl.float32)
        s = tl.sum(kk * q[None, :], 1)
        s = tl.where(nm, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))           # finite: every split holds >= 1 key
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        vv = tl.load(v_base + off * svn + d[None, :], mask=msk, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * vv, 0)
        m_i = m_new
    if SINGLE:
        tl.store(OUT + b * sob + h * soh + d, (acc / l_i).to(OUT.dtype.element_ty), mask=dmask)
    else:
        row = bh.to(tl.int64) * NSPLIT + sp
        tl.store(PACC + row * HEAD_DIM + d, acc, mask=dmask)
        tl.store(PML + row * 2, m_i)
        tl.store(PML + row * 2 + 1, l_i)


@triton.jit
def _decode_merge_kernel(
    OUT, PACC, PML, sob, soh, H, NSPLIT,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    s = tl.arange(0, BS)
    sm = s < NSPLIT
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    row = bh.to(tl.int64) * NSPLIT + s
    m = tl.load(PML + row * 2, mask=sm, other=float("-inf"))
    l = tl.load(PML + row * 2 + 1, mask=sm, other=0.0)
    acc = tl.load(PACC + row[:, None] * HEAD_DIM + d[None, :], mask=sm[:, None] & dmask[None, :],
                  other=0.0)
    m_all = tl.max(m, 0)
    w = tl.where(sm, tl.exp2(m - m_all), 0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(OUT + b * sob + h * soh + d, out.to(OUT.dtype.element_ty), mask=dmask)


def _num_splits(bh: int, n: int, bn: int, per_sm: int) -> int:
    if _interpreting():
        return min(triton.cdiv(n, bn), 3)
    target = per_sm * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, min(triton.cdiv(n, bn), triton.cdiv(target, bh)))


def check_decode_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """``q [B, H, Dh]`` and non-empty caches ``[B, H, N, Dh]`` of the same shape, on q's device."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [B, H, Dh] and caches [B, H, N, Dh], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, Dh = q.shape
    if tuple(k_cache.shape[:2]) != (B, H) or k_cache.shape[3] != Dh:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    if not q.device == k_cache.device == v_cache.device:
        raise ValueError(f"q and the caches must be on one device, got {q.device}, {k_cache.device}, "
                         f"{v_cache.device}")
    if k_cache.shape[2] == 0:
        raise ValueError("the KV cache is empty: a decoding step needs at least one cached entry")


def triton_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            scale: Optional[float] = None, num_splits: Optional[int] = None,
                            block_n: Optional[int] = None, num_warps: int = 4,
                            splits_per_sm: int = 4) -> torch.Tensor:
    """Split-K Triton decode attention (see the module docstring). Same contract as
    :func:`decode_attention`; ``num_splits`` / ``block_n`` / ``num_warps`` / ``splits_per_sm``
    override the launch heuristics."""
    check_decode_args(q, k_cache, v_cache)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    B, H, Dh = q.shape
    N = k_cache.shape[2]
    scale = Dh ** -0.5 if scale is None else float(scale)
    q, k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cache, v_cache))
    bn = block_n or (16 if _interpreting() else 64)
    block_d = max(16, triton.next_power_of_2(Dh))
    S = num_splits or _num_splits(B * H, N, bn, splits_per_sm)
    split_len = triton.cdiv(triton.cdiv(N, S), bn) * bn
    S = triton.cdiv(N, split_len)                       # every split holds at least one key
    out = torch.empty((B, H, Dh), dtype=q.dtype, device=q.device)
    if S > 1:
        pacc = torch.empty((B * H * S, Dh), dtype=torch.float32, device=q.device)
        pml = torch.empty((B * H * S, 2), dtype=torch.float32, device=q.device)
    else:
        pacc = pml = out
    _decode_split_kernel[(B * H, S)](
        q, k_cache, v_cache, out, pacc, pml,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        out.stride(0), out.stride(1), H, N, split_len, S, scale * _LOG2E,
        HEAD_DIM=Dh, BLOCK_D=block_d, BN=bn, SINGLE=S == 1, num_warps=num_warps,
    )
    if S > 1:
        _decode_merge_kernel[(B * H,)](
            out, pacc, pml, out.stride(0), out.stride(1), H, S,
            HEAD_DIM=Dh, BLOCK_D=block_d, BS=max(2, triton.next_power_of_2(S)), num_warps=4,
        )
    return out


# SDPA backends for decoding on CUDA. cuDNN attention is left out: it builds an execution plan per
# key length, and during generation the cache grows by one entry per step, so every step paid a
# new plan (measured on an H100: ~50 ms per token for a 4-layer model with a dense cache). None:
# let PyTorch choose.
DECODE_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def sdpa_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          scale: Optional[float] = None) -> torch.Tensor:
    """The same attention through ``torch.nn.functional.scaled_dot_product_attention``."""
    backends = contextlib.nullcontext()
    if q.is_cuda and DECODE_SDPA_BACKENDS is not None:
        backends = sdpa_kernel([getattr(SDPBackend, b) for b in DECODE_SDPA_BACKENDS])
    with backends:
        return F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache, scale=scale).squeeze(2)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Attention of one new token over the compact sparse cache.

    ``q``: ``[B, H, Dh]``; ``k_cache, v_cache``: ``[B, H, N, Dh]`` (any strides, unit stride on Dh,
    e.g. views of a preallocated cache of larger capacity); every entry is attended (the cache
    holds only allowed keys). Returns ``[B, H, Dh]`` in ``q``'s dtype.

    Calls ``torch.nn.functional.scaled_dot_product_attention`` on every device: on the H100 it
    beat the split-K Triton kernel of this module at all realistic cache sizes (module docstring).
    """
    check_decode_args(q, k_cache, v_cache)
    return sdpa_decode_attention(q, k_cache, v_cache, scale)
