"""Forward kernels of the fused dilated attention (launched from :mod:`.fused`, which describes the
algorithm): ``_fwd_kernel`` (one program per query block: gathered far tiles, then the band) and
``_fwd_w0_kernel`` (W = 0 with few global keys: one program per query segment holding every
global key of its head).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import _device_tile, _dot, _global_key, _load_rows, _n_global, _online_update, _row_mask, _row_tile


@triton.jit
def _fwd_kernel(
    Q, K, V, QD, KD, VD, O, LSE,
    sqt, sqb, sqh, skt, skb, skh, svt, svb, svh, sot, sob, soh,
    T, H, W, P, D, CMIN, NS, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, W_ZERO: tl.constexpr, TMA: tl.constexpr,
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
    # TMA: contiguous row tiles come from descriptors of the [T, columns] views (QD: BM rows; KD,
    # VD: BM rows for the W = 0 diagonal, else BN rows for the band); the gathers stay pointers
    kcol = (b * skb + h * skh).to(tl.int32)
    vcol = (b * svb + h * svh).to(tl.int32)
    if TMA == 2:
        QD = _device_tile(Q, T, sqt, BM, HEAD_DIM)
        KD = _device_tile(K, T, skt, BM if W_ZERO else BN, HEAD_DIM)
        VD = _device_tile(V, T, svt, BM if W_ZERO else BN, HEAD_DIM)
    q = _row_tile(QD, q_base, n0, (b * sqb + h * sqh).to(tl.int32), rows, sqt, rmask, d, dmask,
                  EVEN_D, TMA)

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

    if W_ZERO:
        # the band is the query itself: one score per row, no matrix product
        kn = _row_tile(KD, k_base, n0, kcol, rows, skt, rmask, d, dmask, EVEN_D, TMA).to(tl.float32)
        vn = _row_tile(VD, v_base, n0, vcol, rows, svt, rmask, d, dmask, EVEN_D, TMA).to(tl.float32)
        s = tl.sum(q.to(tl.float32) * kn, 1) * qk_scale
        s = tl.where(rmask, s, float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use)
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * vn
        m_i = m_new
    else:
        # near keys: the causal band [t - W, t], tiles covering [n0 - W, n0 + BM)
        lo = tl.maximum(n0 - W, 0) // BN * BN
        hi = tl.minimum(n0 + BM, T)
        for c0 in range(lo, hi, BN):
            cols = c0 + tl.arange(0, BN)
            cm = cols < T
            kk = _row_tile(KD, k_base, c0, kcol, cols, skt, cm, d, dmask, EVEN_D, TMA)
            vv = _row_tile(VD, v_base, c0, vcol, cols, svt, cm, d, dmask, EVEN_D, TMA)
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


@triton.jit
def _fwd_w0_kernel(
    Q, K, V, QD, KD, VD, O, OD, LSE,
    sqt, sqb, sqh, skt, skb, skh, svt, svb, svh, sot, sob, soh,
    T, H, P, D, CMIN, NS, SEG, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLK: tl.constexpr, NGC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr, LOOP_STAGES: tl.constexpr, TMA_STORE: tl.constexpr = False,
):
    """Single-pass forward for W = 0 with few global keys (``NG <= NGC``): one program per
    (segment of SEG queries, batch x head) loads the global keys of its head once, then walks its
    query blocks with the row tiles (q and the diagonal's k, v) prefetched ``LOOP_STAGES - 1``
    blocks ahead. Every allowed key of a row (the gathered global keys ``j < t`` and the row
    itself) is seen in one iteration, so the softmax is exact, with no running rescale.

    Against the per-query-block forward (one program per block, each gathering the global keys
    from L2 and waiting on its own loads) this keeps the loads of the next blocks in flight and
    reads the global keys once per segment. TMA_STORE: o stored as TMA tiles of the host
    descriptor OD (rows past T dropped by the TMA unit)."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    m_lo = pid_s * SEG
    m_hi = tl.minimum(m_lo + SEG, T)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    # global keys some query of the segment sees beyond its diagonal (j < t <= m_hi - 1)
    g = tl.arange(0, NGC)
    gv = g < _n_global(m_hi - 2, P, D, CMIN)
    j = _global_key(g, P, D, CMIN, NS)
    kg = _load_rows(k_base, j, skt, gv, d, dmask, EVEN_D)
    vg = _load_rows(v_base, j, svt, gv, d, dmask, EVEN_D)
    if TMA == 2:
        QD = _device_tile(Q, T, sqt, BLK, HEAD_DIM)
        KD = _device_tile(K, T, skt, BLK, HEAD_DIM)
        VD = _device_tile(V, T, svt, BLK, HEAD_DIM)
    qcol = (b * sqb + h * sqh).to(tl.int32)
    kcol = (b * skb + h * skh).to(tl.int32)
    vcol = (b * svb + h * svh).to(tl.int32)
    for m0 in tl.range(m_lo, m_hi, BLK, num_stages=LOOP_STAGES):
        rows = m0 + tl.arange(0, BLK)
        rm = rows < m_hi
        q = _row_tile(QD, q_base, m0, qcol, rows, sqt, rm, d, dmask, EVEN_D, TMA)
        kn = _row_tile(KD, k_base, m0, kcol, rows, skt, rm, d, dmask, EVEN_D, TMA)
        vn = _row_tile(VD, v_base, m0, vcol, rows, svt, rm, d, dmask, EVEN_D, TMA)
        s = _dot(q, tl.trans(kg), PREC, UPCAST) * qk_scale
        s = tl.where(gv[None, :] & (j[None, :] < rows[:, None]), s, float("-inf"))
        s_d = tl.sum(q.to(tl.float32) * kn.to(tl.float32), 1) * qk_scale    # the row itself
        m = tl.maximum(tl.max(s, 1), s_d)                                     # finite: s_d is
        p = tl.exp2(s - m[:, None])
        p_d = tl.exp2(s_d - m)
        l_i = tl.sum(p, 1) + p_d
        acc = _dot(p.to(vg.dtype), vg, PREC, UPCAST) + p_d[:, None] * vn.to(tl.float32)
        out = (acc / l_i[:, None]).to(O.dtype.element_ty)
        if TMA_STORE:
            OD.store([m0, (b * sob + h * soh).to(tl.int32)], out)
        else:
            o_ptr = o_base + rows[:, None].to(tl.int64) * sot + d[None, :]
            tl.store(o_ptr, out, mask=_row_mask(rm, dmask, EVEN_D))
        tl.store(LSE + bh.to(tl.int64) * T + rows, (m + tl.log2(l_i)) * 0.6931471805599453, mask=rm)
