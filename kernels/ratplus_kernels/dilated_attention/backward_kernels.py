"""Backward kernels of the fused dilated attention (launched from :mod:`.fused`, which describes the
algorithm): query-major ``dq`` (``_bwd_dq_kernel``), key-major band ``dk, dv``
(``_bwd_dkdv_kernel``), key-major far ``dk, dv`` of the gathered global keys (``_bwd_far_kernel``),
the single pass for W = 0 (``_bwd_w0_kernel``) and the copy of the global rows from their fp32
buffers (``_bwd_global_kernel``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import _device_tile, _dot, _global_key, _load_rows, _n_global, _row_mask, _row_tile


@triton.jit
def _add_global_rows(DKG, DVG, dk, dv, dk_scale, bh64, NG, g, gmask, d, dmask, HEAD_DIM: tl.constexpr,
                     EVEN_D: tl.constexpr):
    """Add fp32 rows of ``dk * dk_scale, dv`` into the compact global-key buffers ``[B*H, NG, Dh]`` at the
    compact numbers ``g`` (rows where ``gmask``), with relaxed atomics: several programs add to
    the same global key, and the sum is written once by ``_bwd_global_kernel``."""
    gp = (bh64 * NG + g)[:, None] * HEAD_DIM + d[None, :]
    gm = _row_mask(gmask, dmask, EVEN_D)
    tl.atomic_add(DKG + gp, dk * dk_scale, mask=gm, sem="relaxed")
    tl.atomic_add(DVG + gp, dv, mask=gm, sem="relaxed")


@triton.jit
def _bwd_dq_loop(dq, q, do, lse2, delta, rows, rmask, k_base, v_base, skt, svt, d, dmask,
                 c_lo, c_hi, T, W, P, D, CMIN, NS, qk_scale,
                 FAR: tl.constexpr, EVEN_D: tl.constexpr, BN: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr, KD=None, VD=None, kcol=0, vcol=0,
                 TMA: tl.constexpr = False):
    """dq of a query block from key tiles ``[c_lo, c_hi)``: global keys ``g`` gathered by stride
    (FAR, mask ``t - j > W``) or contiguous band keys (mask ``0 <= t - j <= W``)."""
    for c0 in range(c_lo, c_hi, BN):
        c = c0 + tl.arange(0, BN)
        cm = c < c_hi
        if FAR:
            cols = _global_key(c, P, D, CMIN, NS)
        else:
            cols = c
        # TMA: contiguous band rows only (past c_hi: masked below); gathered far keys: pointers
        kk = _row_tile(KD, k_base, c0, kcol, cols, skt, cm, d, dmask, EVEN_D, TMA and not FAR)
        vv = _row_tile(VD, v_base, c0, vcol, cols, svt, cm, d, dmask, EVEN_D, TMA and not FAR)
        s = _dot(q, tl.trans(kk), PREC, UPCAST) * qk_scale                     # [BLK, BN]
        diff = rows[:, None] - cols[None, :]
        if FAR:
            allowed = rmask[:, None] & cm[None, :] & (diff > W)
        else:
            allowed = rmask[:, None] & cm[None, :] & (diff >= 0) & (diff <= W)
        p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(vv), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kk.dtype), kk, PREC, UPCAST)
    return dq


@triton.jit
def _bwd_dkdv_loop(dk, dv, kn, vn, cols, cm, q_base, do_base, lse_base, delta_base, sqt, sdt,
                   d, dmask, m_lo, m_hi, W, qk_scale, FAR: tl.constexpr, EVEN_D: tl.constexpr,
                   BM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, QD=None, DOD=None,
                   qcol=0, dcol=0, TMA: tl.constexpr = False):
    """dk (unscaled), dv of a key tile from queries ``[m_lo, m_hi)``; mask ``t - j > W`` (FAR)
    or ``0 <= t - j <= W`` (band). Reads the delta written by the dq kernel."""
    for m0 in range(m_lo, m_hi, BM):
        qr = m0 + tl.arange(0, BM)
        qm = qr < m_hi
        # TMA: rows past m_hi are masked out below
        qq = _row_tile(QD, q_base, m0, qcol, qr, sqt, qm, d, dmask, EVEN_D, TMA)
        dd = _row_tile(DOD, do_base, m0, dcol, qr, sdt, qm, d, dmask, EVEN_D, TMA)
        l2 = tl.load(lse_base + qr, mask=qm, other=0.0) * 1.4426950408889634
        dl = tl.load(delta_base + qr, mask=qm, other=0.0)
        sT = _dot(kn, tl.trans(qq), PREC, UPCAST) * qk_scale                   # [BN, BM]
        diffT = qr[None, :] - cols[:, None]
        if FAR:
            allowed = cm[:, None] & qm[None, :] & (diffT > W)
        else:
            allowed = cm[:, None] & qm[None, :] & (diffT >= 0) & (diffT <= W)
        pT = tl.where(allowed, tl.exp2(sT - l2[None, :]), 0.0)
        dv += _dot(pT.to(dd.dtype), dd, PREC, UPCAST)
        dpT = _dot(vn, tl.trans(dd), PREC, UPCAST)
        dsT = pT * (dpT - dl[None, :])
        dk += _dot(dsT.to(qq.dtype), qq, PREC, UPCAST)
    return dk, dv


@triton.jit
def _bwd_store_dkdv(dk, dv, cols, cm, DK, DV, DKG, DVG, out_base, sgt, d, dmask, bh64, NG,
                    P, D, CMIN, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    """Band contributions of a key block. Ordinary keys: store dk, dv. Global keys: add into the
    compact fp32 buffers (the far kernel adds there too; the final kernel writes those rows)."""
    is_g = (cols < P) | (((cols + 1) % D) == 0)
    own = cm & (~is_g)
    off = out_base + cols[:, None].to(tl.int64) * sgt + d[None, :]
    tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=_row_mask(own, dmask, EVEN_D))
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=_row_mask(own, dmask, EVEN_D))
    gsel = cm & is_g
    gidx = tl.where(cols < P, cols, P + (cols + 1) // D - 1 - CMIN)
    gidx = tl.where(gsel, gidx, 0)
    _add_global_rows(DKG, DVG, dk, dv, 1.0, bh64, NG, gidx, gsel, d, dmask, HEAD_DIM, EVEN_D)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, QD, KD, VD, OD, DOD, LSE, DLSE, DELTA, DQ, DK, DV, DKG, DVG,
    sqt, sqb, sqh, skt, skb, skh, svt, svb, svh, sot, sob, soh, sdt, sdb, sdh,
    sgt, sgb, sgh,
    T, H, W, P, D, CMIN, NS, NG, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLK: tl.constexpr, BN1: tl.constexpr, BG: tl.constexpr,
    PREC: tl.constexpr, HAS_DLSE: tl.constexpr, UPCAST: tl.constexpr, W_ZERO: tl.constexpr,
    TMA: tl.constexpr,
):
    """Query-major pass: delta, dq (far + band). With W = 0 the band is the diagonal, handled
    elementwise, and this program also owns the band dk, dv of its keys (no band kernel)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    n0 = (tl.num_programs(0) - 1 - pid) * BLK               # most far keys first
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    out_base = b * sgb + h * sgh
    rows = n0 + tl.arange(0, BLK)
    rmask = rows < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    kcol = (b * skb + h * skh).to(tl.int32)
    vcol = (b * svb + h * svh).to(tl.int32)
    if TMA == 2:
        QD = _device_tile(Q, T, sqt, BLK, HEAD_DIM)
        OD = _device_tile(O, T, sot, BLK, HEAD_DIM)
        DOD = _device_tile(DO, T, sdt, BLK, HEAD_DIM)
        KD = _device_tile(K, T, skt, BLK if W_ZERO else BN1, HEAD_DIM)
        VD = _device_tile(V, T, svt, BLK if W_ZERO else BN1, HEAD_DIM)
    # TMA descriptors: BLK rows for q, o, do; BLK (W = 0 diagonal) or BN1 (band) rows for k, v
    q = _row_tile(QD, Q + b * sqb + h * sqh, n0, (b * sqb + h * sqh).to(tl.int32), rows, sqt, rmask,
                  d, dmask, EVEN_D, TMA)
    do = _row_tile(DOD, DO + b * sdb + h * sdh, n0, (b * sdb + h * sdh).to(tl.int32), rows, sdt,
                   rmask, d, dmask, EVEN_D, TMA)
    o = _row_tile(OD, O + b * sob + h * soh, n0, (b * sob + h * soh).to(tl.int32), rows, sot, rmask,
                  d, dmask, EVEN_D, TMA)
    lse2 = tl.load(LSE + bh64 * T + rows, mask=rmask, other=0.0) * 1.4426950408889634
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh64 * T + rows, mask=rmask, other=0.0)
    tl.store(DELTA + bh64 * T + rows, delta, mask=rmask)
    dq_off = out_base + rows[:, None].to(tl.int64) * sgt + d[None, :]
    if W_ZERO:
        # the band is the diagonal: elementwise, done first so that its operands are dead
        # before the far loop; dk, dv of this block's keys are complete after it
        kn = _row_tile(KD, k_base, n0, kcol, rows, skt, rmask, d, dmask, EVEN_D, TMA)
        vn = _row_tile(VD, v_base, n0, vcol, rows, svt, rmask, d, dmask, EVEN_D, TMA)
        p = tl.where(rmask, tl.exp2(tl.sum(q.to(tl.float32) * kn.to(tl.float32), 1) * qk_scale
                                    - lse2), 0.0)
        ds = p * (tl.sum(do.to(tl.float32) * vn.to(tl.float32), 1) - delta)
        _bwd_store_dkdv(ds[:, None] * q.to(tl.float32) * sm_scale, p[:, None] * do.to(tl.float32),
                        rows, rmask, DK, DV, DKG, DVG, out_base, sgt, d, dmask, bh64, NG, P, D, CMIN,
                        HEAD_DIM, EVEN_D)
        dq = ds[:, None] * kn.to(tl.float32)
    else:
        dq = tl.zeros([BLK, BLOCK_D], tl.float32)
        lo = tl.maximum(n0 - W, 0) // BN1 * BN1
        dq = _bwd_dq_loop(dq, q, do, lse2, delta, rows, rmask, k_base, v_base, skt, svt, d, dmask,
                          lo, tl.minimum(n0 + BLK, T), T, W, P, D, CMIN, NS, qk_scale, False,
                          EVEN_D, BN1, PREC, UPCAST, KD, VD, kcol, vcol, TMA)
    t_last = tl.minimum(n0 + BLK, T) - 1
    n_far = _n_global(t_last - W - 1, P, D, CMIN)
    dq = _bwd_dq_loop(dq, q, do, lse2, delta, rows, rmask, k_base, v_base, skt, svt, d, dmask,
                      0, n_far, T, W, P, D, CMIN, NS, qk_scale, True, EVEN_D, BG, PREC, UPCAST)
    tl.store(DQ + dq_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=_row_mask(rmask, dmask, EVEN_D))


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, QD, DOD, LSE, DELTA, DK, DV, DKG, DVG,
    sqt, sqb, sqh, skt, skb, skh, svt, svb, svh, sdt, sdb, sdh,
    sgt, sgb, sgh,
    T, H, W, P, D, CMIN, NG, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLK: tl.constexpr, BM2: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    """Key-major band pass (W > 0): dk, dv of a key block from its band queries."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    n0 = pid * BLK
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    cols = n0 + tl.arange(0, BLK)
    cm = cols < T
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    kn = _load_rows(K + b * skb + h * skh, cols, skt, cm, d, dmask, EVEN_D)
    vn = _load_rows(V + b * svb + h * svh, cols, svt, cm, d, dmask, EVEN_D)
    if TMA == 2:
        QD = _device_tile(Q, T, sqt, BM2, HEAD_DIM)
        DOD = _device_tile(DO, T, sdt, BM2, HEAD_DIM)
    dk = tl.zeros([BLK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLK, BLOCK_D], tl.float32)
    dk, dv = _bwd_dkdv_loop(dk, dv, kn, vn, cols, cm, Q + b * sqb + h * sqh, DO + b * sdb + h * sdh,
                            LSE + bh64 * T, DELTA + bh64 * T, sqt, sdt, d, dmask,
                            n0, tl.minimum(n0 + BLK + W, T), W, qk_scale, False, EVEN_D, BM2,
                            PREC, UPCAST, QD, DOD, (b * sqb + h * sqh).to(tl.int32),
                            (b * sdb + h * sdh).to(tl.int32), TMA)
    _bwd_store_dkdv(dk * sm_scale, dv, cols, cm, DK, DV, DKG, DVG, b * sgb + h * sgh, sgt, d, dmask,
                    bh64, NG, P, D, CMIN, HEAD_DIM, EVEN_D)


@triton.jit
def _bwd_far_kernel(
    Q, K, V, DO, QD, DOD, LSE, DELTA, DKG, DVG,
    sqt, sqb, sqh, skt, skb, skh, svt, svb, svh, sdt, sdb, sdh,
    T, H, W, P, D, CMIN, NS, NG, SEG, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BG: tl.constexpr, BM2: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    """Key-major far pass: one program per (tile of BG gathered global keys, segment of SEG
    queries, batch x head); accumulates the far dk, dv in registers and adds them once into
    the compact fp32 buffers."""
    pid_g = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    g0 = pid_g * BG
    j0 = tl.where(g0 < P, g0, (g0 - P + CMIN + 1) * D - 1)          # smallest key of the tile
    m_lo = tl.maximum(pid_s * SEG, (j0 + W + 1) // BM2 * BM2)
    m_hi = tl.minimum(pid_s * SEG + SEG, T)
    if TMA == 2:                 # outside the branch: a variable keeps one type across it
        QD = _device_tile(Q, T, sqt, BM2, HEAD_DIM)
        DOD = _device_tile(DO, T, sdt, BM2, HEAD_DIM)
    if m_lo < m_hi:
        g = g0 + tl.arange(0, BG)
        gv = g < NG
        j = _global_key(g, P, D, CMIN, NS)
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        kn = _load_rows(K + b * skb + h * skh, j, skt, gv, d, dmask, EVEN_D)
        vn = _load_rows(V + b * svb + h * svh, j, svt, gv, d, dmask, EVEN_D)
        dk = tl.zeros([BG, BLOCK_D], tl.float32)
        dv = tl.zeros([BG, BLOCK_D], tl.float32)
        dk, dv = _bwd_dkdv_loop(dk, dv, kn, vn, j, gv, Q + b * sqb + h * sqh,
                                DO + b * sdb + h * sdh, LSE + bh64 * T, DELTA + bh64 * T, sqt, sdt,
                                d, dmask, m_lo, m_hi, W, qk_scale, True, EVEN_D, BM2, PREC, UPCAST,
                                QD, DOD, (b * sqb + h * sqh).to(tl.int32),
                                (b * sdb + h * sdh).to(tl.int32), TMA)
        _add_global_rows(DKG, DVG, dk, dv, sm_scale, bh64, NG, g, gv, d, dmask, HEAD_DIM, EVEN_D)


@triton.jit
def _bwd_w0_kernel(
    Q, K, V, DO, QD, KD, VD, DOD, LSE, DLSE, DQ, DK, DV, DQD, DKD, DVD, DKG, DVG,
    sqt, sqb, sqh, skt, skb, skh, svt, svb, svh, sdt, sdb, sdh,
    sgt, sgb, sgh,
    T, H, P, D, CMIN, NS, NG, SEG, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLK: tl.constexpr, NGC: tl.constexpr, PREC: tl.constexpr, HAS_DLSE: tl.constexpr,
    UPCAST: tl.constexpr, TMA: tl.constexpr, LOOP_STAGES: tl.constexpr, FOLD_DIAG: tl.constexpr,
    TMA_STORE: tl.constexpr = False, DQ_T: tl.constexpr = False,
):
    """Single-pass backward for W = 0 with few global keys (``NG <= NGC``): one program per
    (segment of SEG queries, batch x head) holds all global keys of its head and their dk, dv
    accumulators, walks its query blocks once (dq and the diagonal dk, dv stored directly) and
    adds its global-key gradients into the compact fp32 buffers once at the end.

    ``delta_t = sum_j P_tj dP_tj`` is formed from the scores already in registers (every allowed
    key of a row is visited in the same iteration), so the output ``o`` is not read: the pass
    moves q, k, v, do in and dq, dk, dv out (7 tensors) instead of the split backward's 8 plus
    the far pass's reread of q, do.

    FOLD_DIAG: the diagonal gradient of a global row (its own key) goes into the key-major tiles
    at the free position ``j == t`` (the far mask is ``j < t``), so the products that accumulate
    ``dk, dv`` of the global keys (and ``dq``) carry it: no per-block atomics into the compact
    buffers, and only ordinary rows are stored directly.

    DQ_T: ``dq`` as the transposed product ``(kg^T dS^T)^T``, whose M side (the head dimension)
    fills a warpgroup's 64-row wgmma even for 16-row query blocks; the direct ``dS kg`` product
    (M = BLK) is an mma.sync instruction, which ptxas cannot overlap with the asynchronous wgmma
    accumulating ``dk, dv`` of the global keys ("wgmma serialized", C7515).
    TMA_STORE (host TMA descriptors DQD, DKD, DVD; FOLD_DIAG): dq, dk, dv stored as TMA tiles, no
    address arithmetic or masks per element."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    do_base = DO + b * sdb + h * sdh
    out_base = b * sgb + h * sgh
    m_lo = pid_s * SEG
    m_hi = tl.minimum(m_lo + SEG, T)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    # global keys some query of the segment sees beyond its diagonal (j < t <= m_hi - 1), and
    # with FOLD_DIAG also those that are rows of the segment (j == t)
    if FOLD_DIAG:
        n_vis = _n_global(m_hi - 1, P, D, CMIN)
    else:
        n_vis = _n_global(m_hi - 2, P, D, CMIN)
    g = tl.arange(0, NGC)
    gv = g < n_vis
    j = _global_key(g, P, D, CMIN, NS)
    kg = _load_rows(k_base, j, skt, gv, d, dmask, EVEN_D)
    vg = _load_rows(v_base, j, svt, gv, d, dmask, EVEN_D)
    dkg = tl.zeros([NGC, BLOCK_D], tl.float32)
    dvg = tl.zeros([NGC, BLOCK_D], tl.float32)
    if TMA == 2:
        QD = _device_tile(Q, T, sqt, BLK, HEAD_DIM)
        KD = _device_tile(K, T, skt, BLK, HEAD_DIM)
        VD = _device_tile(V, T, svt, BLK, HEAD_DIM)
        DOD = _device_tile(DO, T, sdt, BLK, HEAD_DIM)
    for m0 in tl.range(m_lo, m_hi, BLK, num_stages=LOOP_STAGES):
        rows = m0 + tl.arange(0, BLK)
        rm = rows < m_hi
        # TMA: tensor-memory-accelerator tiles of the [T, columns] views (QD..DOD: descriptors):
        # asynchronous, no address registers, prefetched LOOP_STAGES - 1 blocks ahead; the
        # diagonal's k, v are issued here with q, do (pointer loads: below, where they are used)
        q = _row_tile(QD, q_base, m0, (b * sqb + h * sqh).to(tl.int32), rows, sqt, rm, d, dmask,
                      EVEN_D, TMA)
        do = _row_tile(DOD, do_base, m0, (b * sdb + h * sdh).to(tl.int32), rows, sdt, rm, d, dmask,
                       EVEN_D, TMA)
        if TMA:
            kn = _row_tile(KD, k_base, m0, (b * skb + h * skh).to(tl.int32), rows, skt, rm, d, dmask,
                           EVEN_D, TMA)
            vn = _row_tile(VD, v_base, m0, (b * svb + h * svh).to(tl.int32), rows, svt, rm, d, dmask,
                           EVEN_D, TMA)
        lse2 = tl.load(LSE + bh64 * T + rows, mask=rm, other=0.0) * 1.4426950408889634
        # far: the gathered global keys j < t, key-major ([NGC, BLK]: the global keys are the
        # M side of every product, so no operand is replicated across the warps; the result
        # tiles are, at 8 warps: see _W0_CONFIG)
        sT = _dot(kg, tl.trans(q), PREC, UPCAST) * qk_scale
        allowed = gv[:, None] & rm[None, :] & (j[:, None] < rows[None, :])
        pT = tl.where(allowed, tl.exp2(sT - lse2[None, :]), 0.0)
        dpT = _dot(vg, tl.trans(do), PREC, UPCAST)
        # diagonal: one score per row
        if not TMA:                                   # pointer loads here, where used; TMA: above
            kn = _load_rows(k_base, rows, skt, rm, d, dmask, EVEN_D)
            vn = _load_rows(v_base, rows, svt, rm, d, dmask, EVEN_D)
        p_d = tl.where(rm, tl.exp2(tl.sum(q.to(tl.float32) * kn.to(tl.float32), 1) * qk_scale - lse2), 0.0)
        dp_d = tl.sum(do.to(tl.float32) * vn.to(tl.float32), 1)
        delta = tl.sum(pT * dpT, 0) + p_d * dp_d
        if HAS_DLSE:
            delta -= tl.load(DLSE + bh64 * T + rows, mask=rm, other=0.0)
        dsT = pT * (dpT - delta[None, :])
        ds_d = p_d * (dp_d - delta)
        if FOLD_DIAG:
            own = gv[:, None] & rm[None, :] & (j[:, None] == rows[None, :])
            dsT = tl.where(own, ds_d[None, :], dsT)
            pT = tl.where(own, p_d[None, :], pT)
            is_g = (rows < P) | (((rows + 1) % D) == 0)
            ds_d = tl.where(is_g, 0.0, ds_d)          # global rows' dq term: in the product
        dkg += _dot(dsT.to(q.dtype), q, PREC, UPCAST)
        dvg += _dot(pT.to(do.dtype), do, PREC, UPCAST)
        if DQ_T:
            dq = tl.trans(_dot(tl.trans(kg), dsT.to(kg.dtype), PREC, UPCAST))
        else:
            dq = _dot(tl.trans(dsT.to(kg.dtype)), kg, PREC, UPCAST)
        dq = ((dq + ds_d[:, None] * kn.to(tl.float32)) * sm_scale).to(DQ.dtype.element_ty)
        dk = ds_d[:, None] * q.to(tl.float32) * sm_scale
        dv = p_d[:, None] * do.to(tl.float32)
        if TMA_STORE:
            # whole row tiles (rows past T dropped by the TMA unit; a global row's dk, dv are
            # rewritten from the compact buffers after this kernel)
            col = (b * sgb + h * sgh).to(tl.int32)
            DQD.store([m0, col], dq)
            DKD.store([m0, col], dk.to(DK.dtype.element_ty))
            DVD.store([m0, col], dv.to(DV.dtype.element_ty))
        else:
            dq_off = out_base + rows[:, None].to(tl.int64) * sgt + d[None, :]
            tl.store(DQ + dq_off, dq, mask=_row_mask(rm, dmask, EVEN_D))
            if FOLD_DIAG:
                ordinary = _row_mask(rm & ~is_g, dmask, EVEN_D)
                tl.store(DK + dq_off, dk.to(DK.dtype.element_ty), mask=ordinary)
                tl.store(DV + dq_off, dv.to(DV.dtype.element_ty), mask=ordinary)
            else:
                _bwd_store_dkdv(dk, dv, rows, rm, DK, DV, DKG, DVG, out_base, sgt, d, dmask, bh64, NG, P, D,
                                CMIN, HEAD_DIM, EVEN_D)
    _add_global_rows(DKG, DVG, dkg, dvg, sm_scale, bh64, NG, g, gv, d, dmask, HEAD_DIM, EVEN_D)


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
