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

from .tiles import _bwd_tile_emit, _fwd_tile_emit, _fwd_tile_scan, _state_or_zeros, _tile_channels


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
    for c in tl.range(0, tl.cdiv(T, BT), num_stages=STAGES):
        t = (c * BT + rows).to(tl.int64)
        m2 = (t < T)[:, None] & mask_d[None, :]
        P, Lk, Lv = _fwd_tile_scan(g_ptr, k_ptr, v_ptr, t, b, h, d, m2,
                                   sg_t, sg_b, sg_h, sg_d, sk_t, sk_b, sk_h, sk_d, sv_t, sv_b, sv_h, sv_d)
        hk, hv = _fwd_tile_emit(ko_ptr, vo_ptr, inc_ptr, P, Lk, Lv, hk, hv, t, n, NCH, m2, rows,
                                SAVE, BT)
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
        uk, uv = _bwd_tile_emit(g_ptr, k_ptr, v_ptr, dko_ptr, dvo_ptr, dg_ptr, dk_ptr, dv_ptr,
                                h0k_ptr, h0v_ptr, finc_ptr, BT_F, uk, uv, c, t, b, h, d, n, NCH, m2,
                                mask_d, rows, sg_t, sg_b, sg_h, sg_d, sk_t, sk_b, sk_h, sk_d,
                                sv_t, sv_b, sv_h, sv_d, sdk_t, sdk_b, sdk_h, sdk_d,
                                sdv_t, sdv_b, sdv_h, sdv_d, BT, HAS_H0)
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
