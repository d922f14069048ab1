"""Fused Triton RAT+ dilated (sparse) attention: forward and backward.

Same signature and semantics as :func:`ratplus_kernels.dilated_attention.naive.naive_dilated_attention`:
query ``t`` attends key ``j`` iff ``j <= t and (t - j <= W or j < P or (D > 0 and (j+1) % D == 0))``.

Partition of the allowed pairs
------------------------------
Every allowed pair ``(t, j)`` belongs to exactly one of two disjoint sets, decided per element:

* **near**: ``0 <= t - j <= W`` (the causal local band, which contains the query itself);
* **far**: ``t - j > W`` and ``j`` is a *global key*: an initial key ``j < P`` or a chunk-end key
  ``j >= P, (j + 1) % D == 0``.

Global keys are numbered compactly: ``g < P`` is key ``g``; ``g >= P`` is the chunk-end key
``(g - P + P//D + 1) * D - 1``, so the keys at stride ``D`` are loaded as a strided gather (one
256-byte row per key at Dh=128), never by masking dense tiles. The far keys of a query block are a
prefix ``g < n_far`` of that numbering. A key that is both global and inside a query's band is
counted once (as near); initial keys that are also chunk ends are counted once (as initial).
``D = -1`` (local only) has no chunk-end keys; ``D = 1`` makes every key global (dense causal).

Forward (one program per query block of ``BM`` rows of one (batch, head))
---------------------------------------------------------------------------
Online softmax in fp32 (base-2 exponentials, scale folded into the scores) over the gathered far
tiles ``g in [0, n_far)``, then over the contiguous near tiles covering ``[n0 - W, n0 + BM)``; only
those key tiles are visited. Stores the output (input dtype, new contiguous ``[T, B, H, Dh]``)
and the natural-log log-sum-exp (fp32 ``[B, H, T]``). Programs run from the last query block to
the first, so the blocks with the most far keys start first.

Backward (one program per block of ``BLK`` positions, owning those queries *and* those keys)
--------------------------------------------------------------------------------------------
``delta_t = sum(o_t * do_t)`` is recomputed in the kernel from ``o`` and ``do`` (no extra pass).

1. query-major, for the program's queries: far tiles, near key tiles left of the block, then the
   diagonal tile, accumulating ``dq`` in registers (stored once, no atomics);
2. key-major, for the program's keys: the diagonal tile (shared with step 1: its scores are
   computed once for ``dq``, ``dk`` and ``dv``) and the near query tiles right of the block,
   accumulating ``dk, dv`` in registers.

Near pairs therefore need no atomics: the diagonal tile is shared and every off-diagonal band
tile is visited once from each side (recomputing its scores, as flash-attention-2 style Triton
kernels do). Far pairs are the problem: a global key receives gradient from *every* later query
block. We accumulate those contributions with fp32 atomic adds into a compact ``[2, B*H, NG, Dh]``
buffer (NG = number of global keys, about ``P + T/D``) while the query-major step already has the
far scores ``dS`` and ``P`` in registers, instead of a separate key-major pass. The reasons:

* a key-major pass over the global keys must reread all of ``q``, ``do``, ``o`` (or a
  precomputed ``delta``) from HBM — at T=4096, B=4, H=16, Dh=128 bf16 that is 2-3 x 67 MB,
  0.05-0.07 ms at 3 TB/s, against a 0.30 ms budget — and recompute the far scores and ``dP``;
* a key-major pass has only ``B*H*NG/BG`` programs (64 at D=64, T=4096), each walking all
  later query blocks serially, so it must be split along the queries and reduced anyway;
* the atomics land in a buffer of ``2*B*H*NG*Dh*4`` bytes (4 MB at D=64, 17 MB at D=16 for the
  anchor shape), which stays in L2; their number is ``2*Dh*sum_n n_far(n)`` per head (about
  0.5-1 M per head at the anchor shapes).

The near-pass contributions to global keys are added to the same buffer (atomically: the far
contributions of other programs arrive concurrently), and a small final kernel writes the global
rows of ``dk, dv`` from it, so every global row is rounded to the output dtype once. Other rows
are stored directly by their owning program. Atomics make ``dk, dv`` of global keys
non-deterministic at the level of fp32 summation order (like flash-attention's ``dq``).

The log-sum-exp output is differentiable: its gradient enters as ``delta_t - dlse_t``.

Under ``TRITON_INTERPRET=1`` (CPU) the same kernels run through Triton's interpreter with small
blocks (``_INTERPRET_BLOCKS``), so short sequences span several tiles of every kind.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .naive import validate_pattern

__all__ = ["fused_dilated_attention"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# Index helpers
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    sqt, sqb, sqh, skt, skb, skh, svt, svb, svh, sot, sob, soh,
    T, H, W, P, D, CMIN, NS, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    n0 = (tl.num_programs(0) - 1 - pid) * BM          # heaviest (last) query blocks first
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    rows = n0 + tl.arange(0, BM)
    rmask = rows < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = _load_rows(q_base, rows, sqt, rmask, d, dmask, EVEN_D)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)

    # far keys: global keys j with t - j > W for some query t of the block
    t_last = tl.minimum(n0 + BM, T) - 1
    n_far = _n_global(t_last - W - 1, P, D, CMIN)
    for g0 in range(0, n_far, BG):
        g = g0 + tl.arange(0, BG)
        gv = g < n_far
        j = _global_key(g, P, D, CMIN, NS)
        kk = _load_rows(k_base, j, skt, gv, d, dmask, EVEN_D)
        vv = _load_rows(v_base, j, svt, gv, d, dmask, EVEN_D)
        s = _dot(q, tl.trans(kk), PREC, UPCAST) * qk_scale
        allowed = gv[None, :] & ((rows[:, None] - j[None, :]) > W)
        m_i, l_i, acc = _online_update(s, allowed, vv, m_i, l_i, acc, PREC, UPCAST)

    # near keys: the causal band [t - W, t], tiles covering [n0 - W, n0 + BM)
    lo = tl.maximum(n0 - W, 0) // BN * BN
    hi = tl.minimum(n0 + BM, T)
    for c0 in range(lo, hi, BN):
        cols = c0 + tl.arange(0, BN)
        cm = cols < T
        kk = _load_rows(k_base, cols, skt, cm, d, dmask, EVEN_D)
        vv = _load_rows(v_base, cols, svt, cm, d, dmask, EVEN_D)
        s = _dot(q, tl.trans(kk), PREC, UPCAST) * qk_scale
        diff = rows[:, None] - cols[None, :]
        allowed = cm[None, :] & (diff >= 0) & (diff <= W)
        m_i, l_i, acc = _online_update(s, allowed, vv, m_i, l_i, acc, PREC, UPCAST)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptr = O + b * sob + h * soh + rows[:, None].to(tl.int64) * sot + d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=_row_mask(rmask, dmask, EVEN_D))
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * T + rows, lse, mask=rmask)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_kernel(
    Q, K, V, O, DO, LSE, DLSE, DQ, DK, DV, DKG, DVG,
    sqt, sqb, sqh, skt, skb, skh, svt, svb, svh, sot, sob, soh, sdt, sdb, sdh,
    sgt, sgb, sgh,
    T, H, W, P, D, CMIN, NS, NG, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLK: tl.constexpr, BN1: tl.constexpr, BM2: tl.constexpr, BG: tl.constexpr,
    PREC: tl.constexpr, HAS_DLSE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    n0 = (tl.num_programs(0) - 1 - pid) * BLK
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    do_base = DO + b * sdb + h * sdh
    lse_base = LSE + bh64 * T
    dlse_base = DLSE + bh64 * T

    rows = n0 + tl.arange(0, BLK)
    rmask = rows < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM

    q = _load_rows(q_base, rows, sqt, rmask, d, dmask, EVEN_D)
    do = _load_rows(do_base, rows, sdt, rmask, d, dmask, EVEN_D)
    o = _load_rows(o_base, rows, sot, rmask, d, dmask, EVEN_D)
    lse2 = tl.load(lse_base + rows, mask=rmask, other=0.0) * 1.4426950408889634
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_base + rows, mask=rmask, other=0.0)
    dq = tl.zeros([BLK, BLOCK_D], tl.float32)
    g_off = d[None, :]

    # ---- 1a. far keys (query-major; dk, dv of the global keys via atomics) -------------------
    t_last = tl.minimum(n0 + BLK, T) - 1
    n_far = _n_global(t_last - W - 1, P, D, CMIN)
    for g0 in range(0, n_far, BG):
        g = g0 + tl.arange(0, BG)
        gv = g < n_far
        j = _global_key(g, P, D, CMIN, NS)
        kk = _load_rows(k_base, j, skt, gv, d, dmask, EVEN_D)
        vv = _load_rows(v_base, j, svt, gv, d, dmask, EVEN_D)
        sT = _dot(kk, tl.trans(q), PREC, UPCAST) * qk_scale          # [BG, BLK]
        allowed = gv[:, None] & rmask[None, :] & ((rows[None, :] - j[:, None]) > W)
        pT = tl.where(allowed, tl.exp2(sT - lse2[None, :]), 0.0)
        dpT = _dot(vv, tl.trans(do), PREC, UPCAST)                   # [BG, BLK]
        dsT = pT * (dpT - delta[None, :])
        dq += _dot(tl.trans(dsT.to(kk.dtype)), kk, PREC, UPCAST)
        dvc = _dot(pT.to(do.dtype), do, PREC, UPCAST)
        dkc = _dot(dsT.to(q.dtype), q, PREC, UPCAST) * sm_scale
        gp = (bh64 * NG + g)[:, None] * HEAD_DIM + g_off
        gm = _row_mask(gv, dmask, EVEN_D)
        tl.atomic_add(DKG + gp, dkc, mask=gm, sem="relaxed")
        tl.atomic_add(DVG + gp, dvc, mask=gm, sem="relaxed")

    # ---- 1b. near key tiles left of the block (dq only) ------------------------------------------
    lo = tl.maximum(n0 - W, 0) // BN1 * BN1
    for c0 in range(lo, n0, BN1):
        cols = c0 + tl.arange(0, BN1)
        kk = _load_rows(k_base, cols, skt, cols < T, d, dmask, EVEN_D)
        vv = _load_rows(v_base, cols, svt, cols < T, d, dmask, EVEN_D)
        s = _dot(q, tl.trans(kk), PREC, UPCAST) * qk_scale           # [BLK, BN1]
        allowed = rmask[:, None] & ((rows[:, None] - cols[None, :]) <= W)
        p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(vv), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kk.dtype), kk, PREC, UPCAST)

    # ---- 1c / 2a. diagonal tile: queries and keys of this block --------------------------------
    kn = _load_rows(k_base, rows, skt, rmask, d, dmask, EVEN_D)
    vn = _load_rows(v_base, rows, svt, rmask, d, dmask, EVEN_D)
    sT = _dot(kn, tl.trans(q), PREC, UPCAST) * qk_scale              # [keys, queries]
    diffT = rows[None, :] - rows[:, None]
    allowed = rmask[:, None] & rmask[None, :] & (diffT >= 0) & (diffT <= W)
    pT = tl.where(allowed, tl.exp2(sT - lse2[None, :]), 0.0)
    dpT = _dot(vn, tl.trans(do), PREC, UPCAST)
    dsT = pT * (dpT - delta[None, :])
    dq += _dot(tl.trans(dsT.to(kn.dtype)), kn, PREC, UPCAST)
    dq_ptr = DQ + b * sgb + h * sgh + rows[:, None].to(tl.int64) * sgt + d[None, :]
    tl.store(dq_ptr, (dq * sm_scale).to(DQ.dtype.element_ty), mask=_row_mask(rmask, dmask, EVEN_D))
    dv_acc = _dot(pT.to(do.dtype), do, PREC, UPCAST)
    dk_acc = _dot(dsT.to(q.dtype), q, PREC, UPCAST)

    # ---- 2b. near query tiles right of the block (dk, dv) --------------------------------------
    q_hi = tl.minimum(n0 + BLK + W, T)
    for m0 in range(n0 + BLK, q_hi, BM2):
        qr = m0 + tl.arange(0, BM2)
        qm = qr < T
        qq = _load_rows(q_base, qr, sqt, qm, d, dmask, EVEN_D)
        dd = _load_rows(do_base, qr, sdt, qm, d, dmask, EVEN_D)
        oo = _load_rows(o_base, qr, sot, qm, d, dmask, EVEN_D)
        l2 = tl.load(lse_base + qr, mask=qm, other=0.0) * 1.4426950408889634
        dl = tl.sum(oo.to(tl.float32) * dd.to(tl.float32), 1)
        if HAS_DLSE:
            dl -= tl.load(dlse_base + qr, mask=qm, other=0.0)
        sT = _dot(kn, tl.trans(qq), PREC, UPCAST) * qk_scale         # [BLK, BM2]
        allowed = rmask[:, None] & qm[None, :] & ((qr[None, :] - rows[:, None]) <= W)
        pT = tl.where(allowed, tl.exp2(sT - l2[None, :]), 0.0)
        dpT = _dot(vn, tl.trans(dd), PREC, UPCAST)
        dsT = pT * (dpT - dl[None, :])
        dv_acc += _dot(pT.to(dd.dtype), dd, PREC, UPCAST)
        dk_acc += _dot(dsT.to(qq.dtype), qq, PREC, UPCAST)
    dk_acc = dk_acc * sm_scale

    # ---- store: ordinary keys directly, global keys into the compact fp32 buffer -------------
    is_g = (rows < P) | (((rows + 1) % D) == 0)
    own = rmask & (~is_g)
    out_off = b * sgb + h * sgh + rows[:, None].to(tl.int64) * sgt + d[None, :]
    tl.store(DK + out_off, dk_acc.to(DK.dtype.element_ty), mask=_row_mask(own, dmask, EVEN_D))
    tl.store(DV + out_off, dv_acc.to(DV.dtype.element_ty), mask=_row_mask(own, dmask, EVEN_D))
    gidx = tl.where(rows < P, rows, P + (rows + 1) // D - 1 - CMIN)
    gidx = tl.where(rmask & is_g, gidx, 0)
    gp = (bh64 * NG + gidx)[:, None] * HEAD_DIM + g_off
    gm = _row_mask(rmask & is_g, dmask, EVEN_D)
    tl.atomic_add(DKG + gp, dk_acc, mask=gm, sem="relaxed")
    tl.atomic_add(DVG + gp, dv_acc, mask=gm, sem="relaxed")


@triton.jit
def _bwd_global_kernel(
    DKG, DVG, DK, DV, sgt, sgb, sgh, H, NG, P, D, CMIN, NS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BR: tl.constexpr,
):
    """Write the global rows of dk, dv (fp32 sums of near + far contributions) in output dtype."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g = pid * BR + tl.arange(0, BR)
    gv = g < NG
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    m = _row_mask(gv, dmask, EVEN_D)
    src = (bh.to(tl.int64) * NG + g)[:, None] * HEAD_DIM + d[None, :]
    j = _global_key(g, P, D, CMIN, NS)
    dst = b * sgb + h * sgh + j[:, None].to(tl.int64) * sgt + d[None, :]
    tl.store(DK + dst, tl.load(DKG + src, mask=m, other=0.0).to(DK.dtype.element_ty), mask=m)
    tl.store(DV + dst, tl.load(DVG + src, mask=m, other=0.0).to(DV.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
# Interpreter blocks: small, so that short test sequences span several tiles of every kind.
_INTERPRET_BLOCKS = {"fwd": dict(BM=16, BN=16, BG=16), "bwd": dict(BLK=16, BN1=16, BM2=16, BG=16)}
# Optional override of the launch configuration (tests and the benchmark's sweep).
_OVERRIDE: dict = {"fwd": None, "bwd": None}
# The last launched compiled kernels (the benchmark prints their registers / spills).
_LAST_KERNELS: dict = {}


@contextlib.contextmanager
def block_config(fwd: Optional[dict] = None, bwd: Optional[dict] = None):
    """Temporarily force launch configurations (dicts of BM/BN/BG/num_warps/num_stages for the
    forward, BLK/BN1/BM2/BG/num_warps/num_stages for the backward). Tests and benchmarks only."""
    old = dict(_OVERRIDE)
    _OVERRIDE["fwd"], _OVERRIDE["bwd"] = fwd, bwd
    try:
        yield
    finally:
        _OVERRIDE.update(old)


def _new_output(shape, dtype, device):
    """Allocation hook for outputs and gradients (GPU tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _fwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    if _OVERRIDE["fwd"] is not None:
        return dict(_OVERRIDE["fwd"])
    if _interpreting():
        return dict(_INTERPRET_BLOCKS["fwd"], num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BM=64, BN=32, BG=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BM=128, BN=64, BG=64, num_warps=4, num_stages=3)
    return dict(BM=128, BN=64, BG=64, num_warps=8, num_stages=3)


def _bwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    if _OVERRIDE["bwd"] is not None:
        return dict(_OVERRIDE["bwd"])
    if _interpreting():
        return dict(_INTERPRET_BLOCKS["bwd"], num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLK=32, BN1=32, BM2=32, BG=32, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return dict(BLK=64, BN1=64, BM2=64, BG=64, num_warps=4, num_stages=2)
    return dict(BLK=64, BN1=64, BM2=64, BG=64, num_warps=8, num_stages=2)


def _pattern_args(T: int, dilation: int, initial: int):
    """(D_eff, CMIN, NS, NG): D=-1 becomes a stride larger than T (no chunk-end key exists)."""
    D = dilation if dilation > 0 else T + 1
    cmin = initial // D
    ns = max(T // D - cmin, 0)
    ng = min(initial, T) + ns
    return D, cmin, ns, ng


def _dims(head_dim: int):
    block_d = max(16, triton.next_power_of_2(head_dim))
    return block_d, block_d == head_dim


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _interpreting() and dtype == torch.bfloat16


def _forward(q, k, v, dilation, window, initial, scale):
    T, B, H, Dh = q.shape
    D, cmin, ns, _ = _pattern_args(T, dilation, initial)
    out = _new_output((T, B, H, Dh), q.dtype, q.device)
    lse = _new_output((B, H, T), torch.float32, q.device)
    cfg = _fwd_config(Dh, q.dtype)
    block_d, even_d = _dims(Dh)
    grid = (triton.cdiv(T, cfg["BM"]), B * H)
    _LAST_KERNELS["fwd"] = _fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        T, H, window, initial, D, cmin, ns, scale * _LOG2E,
        HEAD_DIM=Dh, BLOCK_D=block_d, EVEN_D=even_d, PREC=_prec(q.dtype), UPCAST=_upcast(q.dtype), **cfg,
    )
    return out, lse


def _backward(q, k, v, out, lse, dout, dlse, dilation, window, initial, scale):
    T, B, H, Dh = q.shape
    D, cmin, ns, ng = _pattern_args(T, dilation, initial)
    dev = q.device
    dq = _new_output((T, B, H, Dh), q.dtype, dev)
    dk = _new_output((T, B, H, Dh), k.dtype, dev)
    dv = _new_output((T, B, H, Dh), v.dtype, dev)
    gbuf = torch.zeros((2, B * H, max(ng, 1), Dh), dtype=torch.float32, device=dev)
    cfg = _bwd_config(Dh, q.dtype)
    block_d, even_d = _dims(Dh)
    has_dlse = dlse is not None
    grid = (triton.cdiv(T, cfg["BLK"]), B * H)
    _LAST_KERNELS["bwd"] = _bwd_kernel[grid](
        q, k, v, out, dout, lse, dlse if has_dlse else lse, dq, dk, dv, gbuf[0], gbuf[1],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *dout.stride()[:3],
        *dq.stride()[:3],
        T, H, window, initial, D, cmin, ns, max(ng, 1), scale * _LOG2E, scale,
        HEAD_DIM=Dh, BLOCK_D=block_d, EVEN_D=even_d, PREC=_prec(q.dtype), HAS_DLSE=has_dlse,
        UPCAST=_upcast(q.dtype), **cfg,
    )
    if ng > 0:
        br = 64
        _bwd_global_kernel[(triton.cdiv(ng, br), B * H)](
            gbuf[0], gbuf[1], dk, dv, *dk.stride()[:3], H, ng, initial, D, cmin, ns,
            HEAD_DIM=Dh, BLOCK_D=block_d, EVEN_D=even_d, BR=br, num_warps=4,
        )
    return dq, dk, dv


class _FusedDilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dilation, window, initial, scale):
        out, lse = _forward(q, k, v, dilation, window, initial, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern = (dilation, window, initial, scale)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dilation, window, initial, scale = ctx.pattern
        if dout is None:
            dout = torch.zeros_like(out)
        elif dout.stride(-1) != 1:
            dout = dout.contiguous()
        if dlse is not None:
            dlse = dlse.to(torch.float32).contiguous()
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, dilation, window, initial, scale)
        return dq, dk, dv, None, None, None, None


def fused_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dilation: int,
    window: int,
    initial: int,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Fused Triton RAT+ sparse attention; same contract as ``naive_dilated_attention``.

    ``q, k, v``: ``[T, B, H, Dh]`` (time-first, any strides on T/B/H, unit stride on Dh, e.g. views
    of the fused projection output), bf16/fp16 (fp32 for tests), Dh <= 128 recommended (any Dh
    works; register pressure grows with it). Returns ``out`` — a new contiguous ``[T, B, H, Dh]``
    tensor in the input dtype — or ``(out, lse)`` with the fp32 natural-log log-sum-exp
    ``[B, H, T]``. Differentiable in ``q, k, v`` (and through ``lse``).
    """
    validate_pattern(dilation, window, initial)
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [T, B, H, Dh] shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("fused_dilated_attention needs CUDA tensors (or TRITON_INTERPRET=1); "
                           "use naive_dilated_attention on CPU")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16,
                                                               torch.float16):
        raise TypeError(f"q, k, v must share a dtype among fp32/bf16/fp16, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    T, B, H, Dh = q.shape
    scale = Dh ** -0.5 if scale is None else float(scale)
    if T == 0 or B * H * Dh == 0:
        out = q.new_empty(q.shape)
        lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    ctx = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        out, lse = _FusedDilatedAttention.apply(q, k, v, int(dilation), int(window), int(initial),
                                                scale)
    return (out, lse) if return_lse else out

