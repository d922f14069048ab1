"""Segment kernels for the RAT+ recurrence: a decoupled look-back between long time segments, each
walked twice by one program with its loads pipelined through shared memory.

Same math, inputs, outputs and saved states as the look-back tiles of :mod:`.fused` and the
streams of :mod:`.streaming`; :mod:`.fused` times all three designs on the first call for a shape
and keeps the fastest. Why a third design:

* the look-back tiles (``BT`` = 16 steps held in registers) keep only ~8 tiles in flight per SM
  (every tile configuration compiles to 8-9 resident CTAs on an H100), and each tile pays a chain
  of dependent memory round trips (tile claim, aggregate publish, look-back, inclusive publish);
* the streams have no such chain but only ``B H D / BD`` programs: at the DESIGN.md anchor (8192
  channels) too few to fill the GPU.

Here a program owns ``BD`` channels of one head for a segment of ``SEG`` steps (a multiple of the
``BT``-step sub-tiles). Sweep 1 walks the segment and composes its sub-tiles' maps into the
segment's aggregate ``h -> A h + B`` (nothing stored but that [BD] triple), publishes it, and
takes the state entering the segment from the look-back over earlier segments (later ones for
the backward). It publishes its inclusive state at once (``A h_in + B``), then sweep 2 walks the
segment again, now with the carry, and writes the outputs (the backward: the gradients). Sweep 2
rereads ``g, k, v`` (backward: ``g, dk~, dv~``) that sweep 1 brought through L2 a few
microseconds earlier, so HBM traffic stays that of one pass; the look-back is over ``T / SEG``
segments instead of ``T / 16`` tiles, and the programs are ``B H D / BD x T / SEG``.

The forward saves its fp32 states every ``SAVE`` steps for the backward (any design), exactly as
the other forwards do.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .lookback import _claim_tile, _look_back, _publish
from .tiles import (
    _affine_combine,
    _bwd_tile_emit,
    _bwd_tile_scan,
    _fwd_tile_emit,
    _fwd_tile_scan,
    _row,
)


@triton.jit
def _publish_map(flag_ptr, map_ptr, n, NCH, mask_d, A, Bk, Bv):
    """Store a segment's aggregate map ``(A, Bk, Bv)`` and release it (flag 1)."""
    tl.store(map_ptr + n, A, mask=mask_d)
    tl.store(map_ptr + NCH + n, Bk, mask=mask_d)
    tl.store(map_ptr + 2 * NCH + n, Bv, mask=mask_d)
    _publish(flag_ptr, 1)


@triton.jit
def _publish_state(flag_ptr, state_ptr, n, NCH, mask_d, hk, hv):
    """Store a segment's inclusive state and release it (flag 2)."""
    tl.store(state_ptr + n, hk, mask=mask_d)
    tl.store(state_ptr + NCH + n, hv, mask=mask_d)
    _publish(flag_ptr, 2)


@triton.jit
def _seg_fwd_kernel(
    g_ptr, k_ptr, v_ptr, ko_ptr, vo_ptr,
    h0k_ptr, h0v_ptr, hTk_ptr, hTv_ptr,
    flag_ptr, agg_ptr, sinc_ptr, inc_ptr,
    T, H, NCH,
    sg_t, sg_b, sg_h, sg_d,
    sk_t, sk_b, sk_h, sk_d,
    sv_t, sv_b, sv_h, sv_d,
    T_KEY, BH_KEY,
    D: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    DEPTH: tl.constexpr,
    SAVE: tl.constexpr,
    SEG: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    VEC: tl.constexpr,
    STAGES: tl.constexpr,
):
    NCB, NC, c, j, n, b, h, d, mask_d, _seg_rows, _seg_t, _seg_m2 = _claim_tile(flag_ptr, T, H, NCH, D, SEG, BD, VEC,
                                                              False)
    rows = tl.arange(0, BT)
    t0 = c * SEG
    n_sub = tl.cdiv(tl.minimum(T - t0, SEG), BT)
    # sweep 1: the segment's aggregate map
    A = tl.full([BD], 1.0, tl.float32)
    Bk = tl.zeros([BD], tl.float32)
    Bv = tl.zeros([BD], tl.float32)
    for s in tl.range(0, n_sub, num_stages=STAGES):
        t = (t0 + s * BT + rows).to(tl.int64)
        m2 = (t < T)[:, None] & mask_d[None, :]
        P, Lk, Lv = _fwd_tile_scan(g_ptr, k_ptr, v_ptr, t, b, h, d, m2,
                                   sg_t, sg_b, sg_h, sg_d, sk_t, sk_b, sk_h, sk_d, sv_t, sv_b, sv_h, sv_d)
        A, Bk, Bv = _affine_combine(A, Bk, Bv, _row(P, rows, BT - 1), _row(Lk, rows, BT - 1),
                                    _row(Lv, rows, BT - 1))
    flags = flag_ptr + 32
    cl = c.to(tl.int64)
    if c > 0:
        _publish_map(flags + c * NCB + j, agg_ptr + cl * 3 * NCH, n, NCH, mask_d, A, Bk, Bv)
    if HAS_H0:
        hk = tl.load(h0k_ptr + n, mask=mask_d & (c == 0), other=0.0)
        hv = tl.load(h0v_ptr + n, mask=mask_d & (c == 0), other=0.0)
    else:
        hk = tl.zeros([BD], tl.float32)
        hv = tl.zeros([BD], tl.float32)
    hk, hv = _look_back(flags, agg_ptr, sinc_ptr, n, NCH, NCB, j, mask_d, c, 1, 0, hk, hv, DEPTH)
    _publish_state(flags + c * NCB + j, sinc_ptr + cl * 2 * NCH, n, NCH, mask_d,
                   A * hk + Bk, A * hv + Bv)
    if STORE_FINAL:
        tl.store(hTk_ptr + n, A * hk + Bk, mask=mask_d & (c == NC - 1))
        tl.store(hTv_ptr + n, A * hv + Bv, mask=mask_d & (c == NC - 1))
    # sweep 2: the outputs, from the carry
    for s in tl.range(0, n_sub, num_stages=STAGES):
        t = (t0 + s * BT + rows).to(tl.int64)
        m2 = (t < T)[:, None] & mask_d[None, :]
        P, Lk, Lv = _fwd_tile_scan(g_ptr, k_ptr, v_ptr, t, b, h, d, m2,
                                   sg_t, sg_b, sg_h, sg_d, sk_t, sk_b, sk_h, sk_d, sv_t, sv_b, sv_h, sv_d)
        hk, hv = _fwd_tile_emit(ko_ptr, vo_ptr, inc_ptr, P, Lk, Lv, hk, hv, t, n, NCH, m2, rows,
                                SAVE, BT)


@triton.jit
def _seg_bwd_kernel(
    g_ptr, k_ptr, v_ptr, dko_ptr, dvo_ptr,
    dg_ptr, dk_ptr, dv_ptr,
    h0k_ptr, h0v_ptr, dhTk_ptr, dhTv_ptr, dh0k_ptr, dh0v_ptr,
    finc_ptr, BT_F,
    flag_ptr, agg_ptr, sinc_ptr,
    T, H, NCH,
    sg_t, sg_b, sg_h, sg_d,
    sk_t, sk_b, sk_h, sk_d,
    sv_t, sv_b, sv_h, sv_d,
    sdk_t, sdk_b, sdk_h, sdk_d,
    sdv_t, sdv_b, sdv_h, sdv_d,
    T_KEY, BH_KEY,
    D: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DHT: tl.constexpr,
    DEPTH: tl.constexpr,
    SEG: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    VEC: tl.constexpr,
    STAGES: tl.constexpr,
):
    NCB, NC, c, j, n, b, h, d, mask_d, _seg_rows, _seg_t, _seg_m2 = _claim_tile(flag_ptr, T, H, NCH, D, SEG, BD, VEC,
                                                              True)
    rows = tl.arange(0, BT)
    t0 = c * SEG
    n_sub = tl.cdiv(tl.minimum(T - t0, SEG), BT)
    SUBS: tl.constexpr = SEG // BT
    # sweep 1 (backwards in time): the segment's map from the carry after it to u of its first step
    A = tl.full([BD], 1.0, tl.float32)
    Bk = tl.zeros([BD], tl.float32)
    Bv = tl.zeros([BD], tl.float32)
    for i in tl.range(0, n_sub, num_stages=STAGES):
        t = (t0 + (n_sub - 1 - i) * BT + rows).to(tl.int64)
        m2 = (t < T)[:, None] & mask_d[None, :]
        _a, _w, _e, Al, Uk, Uv = _bwd_tile_scan(g_ptr, dko_ptr, dvo_ptr, t, b, h, d, m2,
                                             sg_t, sg_b, sg_h, sg_d, sdk_t, sdk_b, sdk_h, sdk_d,
                                             sdv_t, sdv_b, sdv_h, sdv_d)
        A, Bk, Bv = _affine_combine(A, Bk, Bv, _row(Al, rows, 0), _row(Uk, rows, 0), _row(Uv, rows, 0))
    flags = flag_ptr + 32
    cl = c.to(tl.int64)
    if c < NC - 1:
        _publish_map(flags + c * NCB + j, agg_ptr + cl * 3 * NCH, n, NCH, mask_d, A, Bk, Bv)
    if HAS_DHT:                                  # u_T = d(final state)
        uk = tl.load(dhTk_ptr + n, mask=mask_d & (c == NC - 1), other=0.0)
        uv = tl.load(dhTv_ptr + n, mask=mask_d & (c == NC - 1), other=0.0)
    else:
        uk = tl.zeros([BD], tl.float32)
        uv = tl.zeros([BD], tl.float32)
    uk, uv = _look_back(flags, agg_ptr, sinc_ptr, n, NCH, NCB, j, mask_d, c, -1, NC - 1, uk, uv, DEPTH)
    _publish_state(flags + c * NCB + j, sinc_ptr + cl * 2 * NCH, n, NCH, mask_d,
                   A * uk + Bk, A * uv + Bv)
    if HAS_H0:                                   # d h_{-1} = a_0 dh_0 = u_0
        tl.store(dh0k_ptr + n, A * uk + Bk, mask=mask_d & (c == 0))
        tl.store(dh0v_ptr + n, A * uv + Bv, mask=mask_d & (c == 0))
    # sweep 2 (backwards in time): the gradients, from the carry
    for i in tl.range(0, n_sub, num_stages=STAGES):
        s = c * SUBS + n_sub - 1 - i            # sub-tile index in BT-step tiles of the sequence
        t = (s * BT + rows).to(tl.int64)
        m2 = (t < T)[:, None] & mask_d[None, :]
        uk, uv = _bwd_tile_emit(g_ptr, k_ptr, v_ptr, dko_ptr, dvo_ptr, dg_ptr, dk_ptr, dv_ptr,
                                h0k_ptr, h0v_ptr, finc_ptr, BT_F, uk, uv, s, t, b, h, d, n, NCH, m2,
                                mask_d, rows, sg_t, sg_b, sg_h, sg_d, sk_t, sk_b, sk_h, sk_d,
                                sv_t, sv_b, sv_h, sv_d, sdk_t, sdk_b, sdk_h, sdk_d,
                                sdv_t, sdv_b, sdv_h, sdv_d, BT, HAS_H0)


def _seg_cfg(seg, bt, bd, nw, stages):
    """A segment candidate: ``SEG``-step segments of ``BT x BD`` sub-tiles, ``nw`` warps,
    ``stages`` sub-tiles of each input in shared memory (Triton's 16-byte vectors: VEC = 8)."""
    return triton.Config({"SEG": seg, "BT": bt, "BD": bd, "VEC": 8, "STAGES": stages},
                         num_warps=nw, num_stages=1)


def seg_fwd_configs():
    return [_seg_cfg(128, 16, 32, 1, 3), _seg_cfg(256, 16, 32, 1, 3), _seg_cfg(128, 16, 64, 2, 3),
            _seg_cfg(64, 16, 32, 1, 2)]


def seg_bwd_configs():
    return [_seg_cfg(128, 16, 32, 1, 3), _seg_cfg(256, 16, 32, 1, 3), _seg_cfg(128, 16, 16, 1, 3),
            _seg_cfg(64, 16, 32, 1, 2)]


def seg_grid(T, B, H, D):
    def grid(meta):
        return (triton.cdiv(T, meta["SEG"]) * B * H * triton.cdiv(D, meta["BD"]),)
    return grid
