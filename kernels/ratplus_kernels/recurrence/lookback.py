"""Decoupled look-back between the time tiles (or segments) of a parallel scan, shared by the
look-back tiles of :mod:`.fused` and the segments of :mod:`.segments`.

Every tile publishes, per channel block, through one int32 flag: 1 = its aggregate map is
stored, 2 = its inclusive state is stored. A program claims its tile from an atomic counter in
scan order (so every predecessor has started: no deadlock whatever order the hardware schedules
blocks in) and walks back over its predecessors, folding aggregates until it meets an inclusive
state.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import _tile_channels


@triton.jit
def _publish(flag_ptr, state):
    """Release ``state`` (1 = aggregate, 2 = inclusive) for values every thread just stored: a CTA
    barrier, then one thread's release store (the ordering CUTLASS semaphores use)."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, state, sem="release")


@triton.jit
def _look_back(flag_ptr, agg_ptr, inc_ptr, n, NCH, NCB, j, mask, c, STEP: tl.constexpr, stop,
               hk, hv, DEPTH: tl.constexpr):
    """Decoupled look-back over tiles ``c - STEP, c - 2 STEP, ...`` (STEP = +1 forward, -1 backward)
    of channel block ``j``; returns the state entering tile ``c`` (``hk, hv`` unchanged when
    ``c == stop``, the first tile in scan order, which only publishes an inclusive state).

    Control flow depends only on scalar flags read with one-thread acquire atomics (uniform over
    the CTA); the values are then read by every thread through L2 (``.cg``).

    DEPTH == 0: greedy, the first predecessor found with an inclusive state ends the walk (the
    association of the fp32 carry then depends on timing: results can differ in the last bits
    between runs). DEPTH > 0: deterministic, always the aggregates of the DEPTH - 1 nearest
    predecessors folded onto the inclusive state of tile ``c - DEPTH STEP`` (or ``stop``).
    """
    if c != stop:
        acc_a = tl.full(hk.shape, 1.0, tl.float32)
        acc_k = tl.zeros(hk.shape, tl.float32)
        acc_v = tl.zeros(hk.shape, tl.float32)
        if STEP > 0:
            target = tl.maximum(c - DEPTH, stop)
        else:
            target = tl.minimum(c + DEPTH, stop)
        p = c - STEP
        done = 0
        while done == 0:
            f = tl.atomic_add(flag_ptr + p * NCB + j, 0, sem="acquire")
            if DEPTH > 0:
                use_inc = (f == 2) & (p == target)
                use_agg = (f >= 1) & (p != target)
            else:
                use_inc = f == 2
                use_agg = f == 1
            pl = p.to(tl.int64)
            if use_inc:
                o_inc = pl * 2 * NCH + n
                ik = tl.load(inc_ptr + o_inc, mask=mask, other=0.0, cache_modifier=".cg")
                iv = tl.load(inc_ptr + o_inc + NCH, mask=mask, other=0.0, cache_modifier=".cg")
                hk = acc_a * ik + acc_k
                hv = acc_a * iv + acc_v
                done = 1
            if use_agg:
                o_agg = pl * 3 * NCH + n
                aa = tl.load(agg_ptr + o_agg, mask=mask, other=1.0, cache_modifier=".cg")
                ak = tl.load(agg_ptr + o_agg + NCH, mask=mask, other=0.0, cache_modifier=".cg")
                av = tl.load(agg_ptr + o_agg + 2 * NCH, mask=mask, other=0.0, cache_modifier=".cg")
                acc_k = acc_a * ak + acc_k
                acc_v = acc_a * av + acc_v
                acc_a = acc_a * aa
                p = p - STEP
    return hk, hv


@triton.jit
def _claim_tile(flag_ptr, T, H, NCH, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                VEC: tl.constexpr, REVERSE: tl.constexpr):
    """The tile this program owns, taken from the atomic counter in scan order (first time tile
    first, or last first when ``REVERSE``), so every predecessor has already started. Returns
    the channel-block count NCB, time-tile count NC, time tile c, channel block j, the channels
    (see :func:`_tile_channels`), the tile's time rows and its [BT, BD] validity mask."""
    NCB = (NCH // D) * ((D + BD - 1) // BD)
    NC = tl.cdiv(T, BT)
    vid = tl.atomic_add(flag_ptr, 1)
    if REVERSE:
        c = NC - 1 - vid // NCB
    else:
        c = vid // NCB
    j = vid % NCB
    n, b, h, d, mask_d = _tile_channels(j, H, D, BD, VEC)
    rows = tl.arange(0, BT)
    t = (c * BT + rows).to(tl.int64)
    m2 = (t < T)[:, None] & mask_d[None, :]
    return NCB, NC, c, j, n, b, h, d, mask_d, rows, t, m2
