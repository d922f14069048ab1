"""Triton building blocks shared by the two recurrence designs (:mod:`.fused`: tiles with a
decoupled look-back; :mod:`.streaming`: one program per channel block walking the sequence).

A *tile* is ``BT`` time steps x ``BD`` channels of one head of a strided ``[T, B, H, D]`` tensor,
held in registers in fp32. Its recurrence ``h -> a h + (1 - a) x`` is an affine map per step; a
tile's steps compose with :func:`_affine_combine` in ``tl.associative_scan``.

The forward leaves its fp32 states at the end of every ``BT_F`` steps in an ``inc`` buffer
``[cdiv(T, BT_F), 2, B H D]`` (keys then values): the backward recomputes each of its tiles'
forward states from there (:func:`_residual_inputs`), whichever design ran either direction.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _affine_combine(a1, bk1, bv1, a2, bk2, bv2):
    # (a1, b1) applied first, then (a2, b2):  h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * bk1 + bk2, a2 * bv1 + bv2


@triton.jit
def _gates(gx, valid):
    """a = sigmoid(g), 1 - a = sigmoid(-g) and e = exp(-g) = (1 - a) / a in fp32 with one exp and
    one fast reciprocal; invalid (padding) elements get the identity map a = 1, 1 - a = e = 0.

    g is clamped to [-30, 80]: below -30, a < 1e-13 is replaced by sigmoid(-30) (a relative change
    of the outputs below 1e-13) so that e = (1 - a) / a stays finite and the backward's ``e * u``
    (u = a dh) never meets fp32 subnormals."""
    e = tl.exp(-tl.clamp(gx, -30.0, 80.0))
    a = tl.fdiv(tl.full(gx.shape, 1.0, tl.float32), 1.0 + e)
    w = e * a
    return tl.where(valid, a, 1.0), tl.where(valid, w, 0.0), tl.where(valid, e, 0.0)


@triton.jit
def _store_row(ptr, x, rows, r: tl.constexpr, mask):
    """Store row ``r`` of the [BT, BD] tile ``x`` at ``ptr`` ([BD] pointers): only the threads that
    own that row store, so no cross-thread reduction is needed to extract it."""
    sel = (rows[:, None] == r) & mask[None, :]
    tl.store(ptr[None, :] + rows[:, None] * 0, x, mask=sel)


@triton.jit
def _load_raw(ptr, t, b, h, d, m2, s_t, s_b, s_h, s_d):
    """The ``[BT, BD]`` tile (time rows ``t``, channels ``d`` of head ``(b, h)``) of a strided
    ``[T, B, H, D]`` tensor in its own dtype; masked elements are 0."""
    return tl.load(ptr + t[:, None] * s_t + (b * s_b + h * s_h) + d[None, :] * s_d,
                   mask=m2, other=0.0)


@triton.jit
def _load_tile(ptr, t, b, h, d, m2, s_t, s_b, s_h, s_d):
    """:func:`_load_raw` in fp32."""
    return _load_raw(ptr, t, b, h, d, m2, s_t, s_b, s_h, s_d).to(tl.float32)


@triton.jit
def _tile_channels(j, H, D: tl.constexpr, BD: tl.constexpr, VEC: tl.constexpr):
    """Channels of channel block ``j``: blocks never span heads, so (b, h) are scalars of the
    program and the addresses of VEC consecutive channels are provably contiguous (vectorised
    loads; per-element head indices cost 2.8x in a measured variant). Returns the flat channel
    index ``n = (b H + h) D + d``, b, h, d and the channel mask."""
    NDB: tl.constexpr = (D + BD - 1) // BD
    bh = j // NDB
    d = (j % NDB) * BD + tl.arange(0, BD)
    d = tl.max_contiguous(tl.multiple_of(d, VEC), VEC)   # VEC channels per thread: time in-thread
    return bh * D + d, (bh // H).to(tl.int64), (bh % H).to(tl.int64), d, d < D


@triton.jit
def _residual_inputs(k_ptr, v_ptr, h0k_ptr, h0v_ptr, finc_ptr, BT_F, NCH,
                     c, t, b, h, d, n, m2, mask_d,
                     sk_t, sk_b, sk_h, sk_d, sv_t, sv_b, sv_h, sv_d,
                     BT: tl.constexpr, HAS_H0: tl.constexpr):
    """Backward helper: what the recompute of this tile's forward states reads, ``k, v`` (own
    dtype: half the registers while they wait) and the forward's state at the step right before
    this tile (``finc_ptr``: the forward's ``inc`` buffer, one row per ``BT_F`` steps; ``BT`` is a
    multiple of ``BT_F``), or the initial state for the first tile."""
    kx = _load_raw(k_ptr, t, b, h, d, m2, sk_t, sk_b, sk_h, sk_d)
    vx = _load_raw(v_ptr, t, b, h, d, m2, sv_t, sv_b, sv_h, sv_d)
    ql = ((c * BT) // BT_F - 1).to(tl.int64)     # forward state row that ends right before this tile
    hk_in = tl.load(finc_ptr + ql * 2 * NCH + n, mask=mask_d & (c > 0), other=0.0)
    hv_in = tl.load(finc_ptr + ql * 2 * NCH + NCH + n, mask=mask_d & (c > 0), other=0.0)
    if HAS_H0:
        hk_in = tl.where(c == 0, tl.load(h0k_ptr + n, mask=mask_d, other=0.0), hk_in)
        hv_in = tl.where(c == 0, tl.load(h0v_ptr + n, mask=mask_d, other=0.0), hv_in)
    else:
        hk_in = tl.where(c == 0, 0.0, hk_in)
        hv_in = tl.where(c == 0, 0.0, hv_in)
    return kx, vx, hk_in, hv_in


@triton.jit
def _residuals(kx, vx, hk_in, hv_in, a, w):
    """The tile's forward states ``h_t`` recomputed from its inputs; returns ``h_t - x_t`` for
    both streams (all the gradient needs of them)."""
    kx = kx.to(tl.float32)
    vx = vx.to(tl.float32)
    P, Lk, Lv = tl.associative_scan((a, w * kx, w * vx), 0, _affine_combine)
    return P * hk_in[None, :] + Lk - kx, P * hv_in[None, :] + Lv - vx


@triton.jit
def _state_or_zeros(pk, pv, n, mask, HAS: tl.constexpr, BD: tl.constexpr):
    """An fp32 ``[BD]`` state pair (keys, values) of channels ``n``, or zeros when absent."""
    if HAS:
        return tl.load(pk + n, mask=mask, other=0.0), tl.load(pv + n, mask=mask, other=0.0)
    else:
        return tl.zeros([BD], tl.float32), tl.zeros([BD], tl.float32)


@triton.jit
def _store_grads(dg_ptr, dk_ptr, dv_ptr, t, b, h, d, n, NCH, m2, e, rk, rv, uk, uv,
                 s_t, s_b, s_h, s_d, LIKE_INPUTS: tl.constexpr):
    """The tile's gradients from ``u = a dh`` and the residuals ``h - x`` (fp32 math)::

        dk = (1 - a) dh = e u,   dv = e u^v,   dg = e sum_s (h_t - x_t) u_t

    stored contiguously, or, with ``LIKE_INPUTS``, with the strides ``s_*`` that ``g, k, v`` share
    (slots of the fused projection's gradient: :mod:`.grad_destination`). One offset tile serves
    the three stores either way (three int64 tiles cost registers the backward does not have)."""
    if LIKE_INPUTS:
        o_out = t[:, None] * s_t + (b * s_b + h * s_h) + d[None, :] * s_d
    else:
        o_out = t[:, None] * NCH + n[None, :]
    tl.store(dg_ptr + o_out, (e * (rk * uk + rv * uv)).to(dg_ptr.dtype.element_ty), mask=m2)
    tl.store(dk_ptr + o_out, (e * uk).to(dk_ptr.dtype.element_ty), mask=m2)
    tl.store(dv_ptr + o_out, (e * uv).to(dv_ptr.dtype.element_ty), mask=m2)
