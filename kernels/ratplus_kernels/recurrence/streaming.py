"""Streaming Triton kernels for the RAT+ recurrence: one program per channel block walks the
whole sequence, the carry in registers, the loads software-pipelined through shared memory.

Same math, inputs, outputs and saved states as the look-back kernels of :mod:`.fused` (which
picks, per shape, whichever design its timings find faster). The differences:

* no look-back and no atomics: a program owns ``BD`` channels of one head for all of ``T`` and
  runs its ``BT``-step tiles in order (backwards in time for the backward), handing the state of
  each tile's last (first) row to the next in registers. Results do not depend on timing.
* ``tl.range(..., num_stages=STAGES)`` makes Triton copy the next ``STAGES - 1`` tiles of every
  input into shared memory (``cp.async``) while the current one is computed, so each program
  keeps several tiles of loads in flight without holding them in registers.
* parallelism is only ``B H D / BD`` programs. With enough channels (e.g. B=64, T=1024 or B=16,
  T=4096 at 16x128 heads) that fills the GPU and the streams run closer to copy bandwidth than
  the look-back tiles (H100, sixth session: 14-20% less time fwd+bwd); with few channels (the
  DESIGN.md anchor B=4, T=4096: 256 programs) each program's chain of tiles is too long and the
  look-back design wins. docs/benchmarks.md has the numbers.

The forward stores its fp32 states every ``SAVE`` steps into the ``inc`` buffer that the
backward (of either design) reads, exactly as the look-back forward stores its tile ends.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (
    _affine_combine,
    _gates,
    _load_tile,
    _residual_inputs,
    _residuals,
    _state_or_zeros,
    _store_grads,
    _tile_channels,
)


@triton.jit
def _row(x, rows, r: tl.constexpr):
    """Row ``r`` of the [BT, BD] tile ``x`` as a [BD] vector (the carry to the next tile)."""
    return tl.sum(tl.where(rows[:, None] == r, x, 0.0), 0)


@triton.jit
def _stream_fwd_kernel(
    g_ptr, k_ptr, v_ptr, ko_ptr, vo_ptr,
    h0k_ptr, h0v_ptr, hTk_ptr, hTv_ptr,
    inc_ptr,
    T, H, NCH,
    sg_t, sg_b, sg_h, sg_d,
    sk_t, sk_b, sk_h, sk_d,
    sv_t, sv_b, sv_h, sv_d,
    T_KEY, BH_KEY,
    D: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    SAVE: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    VEC: tl.constexpr,
    STAGES: tl.constexpr,
):
    n, b, h, d, mask_d = _tile_channels(tl.program_id(0), H, D, BD, VEC)
    rows = tl.arange(0, BT)
    hk, hv = _state_or_zeros(h0k_ptr, h0v_ptr, n, mask_d, HAS_H0, BD)
    saved = ((rows % SAVE) == SAVE - 1)[:, None]
    for c in tl.range(0, tl.cdiv(T, BT), num_stages=STAGES):
        t = (c * BT + rows).to(tl.int64)
        m2 = (t < T)[:, None] & mask_d[None, :]
        gx = _load_tile(g_ptr, t, b, h, d, m2, sg_t, sg_b, sg_h, sg_d)
        kx = _load_tile(k_ptr, t, b, h, d, m2, sk_t, sk_b, sk_h, sk_d)
        vx = _load_tile(v_ptr, t, b, h, d, m2, sv_t, sv_b, sv_h, sv_d)
        a, w, _ = _gates(gx, m2)                 # padding rows are the identity map
        P, Lk, Lv = tl.associative_scan((a, w * kx, w * vx), 0, _affine_combine)
        yk = P * hk[None, :] + Lk
        yv = P * hv[None, :] + Lv
        o_out = t[:, None] * NCH + n[None, :]
        tl.store(ko_ptr + o_out, yk.to(ko_ptr.dtype.element_ty), mask=m2)
        tl.store(vo_ptr + o_out, yv.to(vo_ptr.dtype.element_ty), mask=m2)
        o_inc = inc_ptr + (t // SAVE)[:, None] * 2 * NCH + n[None, :]
        tl.store(o_inc, yk, mask=saved & m2)
        tl.store(o_inc + NCH, yv, mask=saved & m2)
        hk = _row(yk, rows, BT - 1)
        hv = _row(yv, rows, BT - 1)
    if STORE_FINAL:
        tl.store(hTk_ptr + n, hk, mask=mask_d)
        tl.store(hTv_ptr + n, hv, mask=mask_d)


@triton.jit
def _stream_bwd_kernel(
    g_ptr, k_ptr, v_ptr, dko_ptr, dvo_ptr,
    dg_ptr, dk_ptr, dv_ptr,
    h0k_ptr, h0v_ptr, dhTk_ptr, dhTv_ptr, dh0k_ptr, dh0v_ptr,
    finc_ptr, BT_F,
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
    GRADS_LIKE_INPUTS: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    VEC: tl.constexpr,
    STAGES: tl.constexpr,
):
    n, b, h, d, mask_d = _tile_channels(tl.program_id(0), H, D, BD, VEC)
    rows = tl.arange(0, BT)
    uk, uv = _state_or_zeros(dhTk_ptr, dhTv_ptr, n, mask_d, HAS_DHT, BD)   # u_T = d(final state)
    NC = tl.cdiv(T, BT)
    for i in tl.range(0, NC, num_stages=STAGES):
        c = NC - 1 - i
        t = (c * BT + rows).to(tl.int64)
        m2 = (t < T)[:, None] & mask_d[None, :]
        gx = _load_tile(g_ptr, t, b, h, d, m2, sg_t, sg_b, sg_h, sg_d)
        dyk = _load_tile(dko_ptr, t, b, h, d, m2, sdk_t, sdk_b, sdk_h, sdk_d)
        dyv = _load_tile(dvo_ptr, t, b, h, d, m2, sdv_t, sdv_b, sdv_h, sdv_d)
        kx, vx, hk_in, hv_in = _residual_inputs(k_ptr, v_ptr, h0k_ptr, h0v_ptr, finc_ptr, BT_F, NCH,
                                                c, t, b, h, d, n, m2, mask_d,
                                                sk_t, sk_b, sk_h, sk_d, sv_t, sv_b, sv_h, sv_d,
                                                BT, HAS_H0)
        a, w, e = _gates(gx, m2)
        # u_t = a_t (dy_t + u_{t+1}) = a_t dh_t, from the carry u of the tile after this one
        Al, Uk, Uv = tl.associative_scan((a, a * dyk, a * dyv), 0, _affine_combine, reverse=True)
        uk_t = Al * uk[None, :] + Uk
        uv_t = Al * uv[None, :] + Uv
        rk, rv = _residuals(kx, vx, hk_in, hv_in, a, w)
        _store_grads(dg_ptr, dk_ptr, dv_ptr, t, b, h, d, n, NCH, m2, e, rk, rv, uk_t, uv_t,
                     sk_t, sk_b, sk_h, sk_d, GRADS_LIKE_INPUTS)
        uk = _row(uk_t, rows, 0)
        uv = _row(uv_t, rows, 0)
    if HAS_H0:                                   # d h_{-1} = a_0 dh_0 = u_0
        tl.store(dh0k_ptr + n, uk, mask=mask_d)
        tl.store(dh0v_ptr + n, uv, mask=mask_d)


def _stream_cfg(bt, bd, nw, stages):
    """A streaming candidate: ``BT x BD`` tiles, ``nw`` warps, ``stages`` tiles of each input in
    shared memory (Triton's default 16-byte vectors: VEC = 8)."""
    return triton.Config({"BT": bt, "BD": bd, "VEC": 8, "STAGES": stages}, num_warps=nw, num_stages=1)


def stream_fwd_configs():
    # The fastest streaming forwards of the sixth session's H100 sweep (GPU-time medians, bf16,
    # 16x128 heads): 16x64 w2 at B=64 T=1024 (0.585 ms), 32x32 w1 at B=16 T=4096 (0.651 ms),
    # 64x16 w2 at the anchor B=4 T=4096 (0.220 ms; the look-back forward takes 0.198 there).
    return [_stream_cfg(16, 64, 2, 4), _stream_cfg(32, 32, 1, 3), _stream_cfg(64, 16, 2, 4),
            _stream_cfg(16, 32, 1, 4)]


def stream_bwd_configs():
    # Same sweep: 16x32 w1 at B=64 and B=16 (1.169 / 1.190 ms), 16x16 w1 (1.336 at B=64),
    # 64x16 w2 at the anchor (0.480; the look-back backward takes 0.39 there).
    return [_stream_cfg(16, 32, 1, 4), _stream_cfg(16, 16, 1, 4), _stream_cfg(64, 16, 2, 4),
            _stream_cfg(16, 64, 2, 4)]


def stream_grid(B, H, D):
    def grid(meta):
        return (B * H * triton.cdiv(D, meta["BD"]),)
    return grid
