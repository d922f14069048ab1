"""Fused Triton kernels for the RAT+ gated recurrence (forward and backward).

Same signature and semantics as :func:`ratplus_kernels.recurrence.naive.naive_gated_recurrence`::

    a_t = sigmoid(g_t);  k~_t = a_t k~_{t-1} + (1 - a_t) k_t;  v~_t = a_t v~_{t-1} + (1 - a_t) v_t

Design (one pass over the data in each direction)
-------------------------------------------------
The ``[T, B, H, D]`` inputs are cut into tiles of ``BT`` time steps x ``BD`` channels of one head.
Each program owns one tile and keeps it in registers:

1. it loads ``g, k, v`` once (any T/B/H/D strides, e.g. views of the fused input projection),
   forms ``a = sigmoid(g)`` and ``1 - a = e a`` (``e = exp(-g)``) in fp32 and runs a local inclusive scan of
   the affine maps ``h -> a h + (1 - a) x`` for both streams at once (``tl.associative_scan``);
2. it gets the state entering its tile with a *decoupled look-back* over the preceding time tiles
   of the same channels: every tile publishes its aggregate map ``(prod a, local k end, local v end)``
   as soon as it has it and its inclusive end state once known; a program walks back over the
   predecessors, folding aggregates until it meets an inclusive state. Programs take their tile
   index from an atomic counter, so every predecessor has already started: no deadlock whatever
   order the hardware schedules blocks in.
3. it applies the carry (``h_t = P_t h_in + L_t``) and writes ``k~, v~`` once.

Each tile publishes through one int32 flag per (tile, channel block): the threads that own the
published row of the tile store its fp32 values (no cross-thread reduction to extract the row), a CTA
barrier, then one thread's release store of the flag (1 = aggregate, 2 = inclusive). Readers spin on
the flag with one-thread acquire atomics, so the look-back's control flow is uniform over the CTA,
then read the values through L2. Only the flags are zero-filled.

The backward is the same machinery run backwards in time on ``u_t = a_t dh_t``, the carry each step
hands to the previous one: ``u_t = a_t (dy_t + u_{t+1})`` with ``u_T`` = the final state's gradient.
Its coefficients are ``a_t`` at the same step, so the gate is read once, unshifted, and one sigmoid
serves both scans. Each backward tile recomputes its forward states from ``g, k, v`` and the
forward's inclusive tile-end states (kept from the forward pass, fp32, one row per tile), so no
``[T, ...]`` fp32 state is ever stored; the recompute runs before the look-back wait, after it, or
after it with its loads issued before it (``EARLY`` = 1 / 0 / 2, autotuned). Gradients (fp32
math, ``e_t = exp(-g_t) = (1 - a_t) / a_t``)::

    dk_t = (1 - a_t) dh^k_t = e_t u^k_t,   dv_t = e_t u^v_t
    dg_t = a_t (1 - a_t) sum_s (h^s_{t-1} - x^s_t) dh^s_t = e_t sum_s (h^s_t - x^s_t) u^s_t
    d h_{-1} = a_0 dh_0 = u_0

(g is clamped to [-30, 80] so that ``e`` stays finite and ``u`` never underflows; below -30 the
gate is ``a < 1e-13`` either way.) Channel blocks never span heads: (b, h) are scalars of a program
and the loads vectorise (a variant with per-element head indices measured 2.8x slower).

HBM traffic: forward reads g, k, v and writes k~, v~; backward reads g, k, v, dk~, dv~ and writes
dg, dk, dv (plus a few bytes per tile of carries). Only the forward's inclusive states (fp32, one
row per tile) are kept for the backward; the aggregates and flags are freed after each launch.

Two designs, chosen per shape: these look-back tiles, and the streaming kernels of
:mod:`.streaming` (one program per channel block walking the sequence, loads pipelined through
shared memory), which are faster when there are many channels (B H D) to spread over the GPU.
On the first call for a shape each design's block is autotuned, the two winners are timed against
each other, and the faster one is kept (per direction; both forwards leave the same state rows,
both backwards read them).

Under ``TRITON_INTERPRET=1`` (CPU) the same kernels run through Triton's interpreter with small
fixed blocks instead of the autotuner.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._env import interpreting as _interpreting
from ..gpu_time import autotune_bench, gpu_median
from . import streaming as _streaming
from .grad_destination import GradDestination, claim_grad_destination
from .tiles import (
    _affine_combine,
    _gates,
    _load_tile,
    _residual_inputs,
    _residuals,
    _store_grads,
    _store_row,
    _tile_channels,
)

State = Tuple[torch.Tensor, torch.Tensor]

__all__ = ["fused_gated_recurrence"]


# --------------------------------------------------------------------------------------------
# Triton helpers
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    g_ptr, k_ptr, v_ptr, ko_ptr, vo_ptr,
    h0k_ptr, h0v_ptr, hTk_ptr, hTv_ptr,
    flag_ptr, agg_ptr, inc_ptr,
    T, H, NCH,
    sg_t, sg_b, sg_h, sg_d,
    sk_t, sk_b, sk_h, sk_d,
    sv_t, sv_b, sv_h, sv_d,
    T_KEY, BH_KEY,
    D: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    DEPTH: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    VEC: tl.constexpr,
):
    NCB, NC, c, j, n, b, h, d, mask_d, rows, t, m2 = _claim_tile(flag_ptr, T, H, NCH, D, BT, BD, VEC,
                                                                  False)

    gx = _load_tile(g_ptr, t, b, h, d, m2, sg_t, sg_b, sg_h, sg_d)
    kx = _load_tile(k_ptr, t, b, h, d, m2, sk_t, sk_b, sk_h, sk_d)
    vx = _load_tile(v_ptr, t, b, h, d, m2, sv_t, sv_b, sv_h, sv_d)
    a, w, _ = _gates(gx, m2)                     # padding rows are the identity map
    P, Lk, Lv = tl.associative_scan((a, w * kx, w * vx), 0, _affine_combine)

    flags = flag_ptr + 32
    cl = c.to(tl.int64)
    if c > 0:                                    # aggregate = the tile's last row (padding: identity)
        o_agg = agg_ptr + cl * 3 * NCH + n
        _store_row(o_agg, P, rows, BT - 1, mask_d)
        _store_row(o_agg + NCH, Lk, rows, BT - 1, mask_d)
        _store_row(o_agg + 2 * NCH, Lv, rows, BT - 1, mask_d)
        _publish(flags + c * NCB + j, 1)

    if HAS_H0:
        hk_in = tl.load(h0k_ptr + n, mask=mask_d & (c == 0), other=0.0)
        hv_in = tl.load(h0v_ptr + n, mask=mask_d & (c == 0), other=0.0)
    else:
        hk_in = tl.zeros([BD], tl.float32)
        hv_in = tl.zeros([BD], tl.float32)
    hk_in, hv_in = _look_back(flags, agg_ptr, inc_ptr, n, NCH, NCB, j, mask_d, c, 1, 0,
                              hk_in, hv_in, DEPTH)

    hk = P * hk_in[None, :] + Lk
    hv = P * hv_in[None, :] + Lv
    o_inc = inc_ptr + cl * 2 * NCH + n
    _store_row(o_inc, hk, rows, BT - 1, mask_d)
    _store_row(o_inc + NCH, hv, rows, BT - 1, mask_d)
    _publish(flags + c * NCB + j, 2)
    if STORE_FINAL:
        _store_row(hTk_ptr + n, hk, rows, BT - 1, mask_d & (c == NC - 1))
        _store_row(hTv_ptr + n, hv, rows, BT - 1, mask_d & (c == NC - 1))
    o_out = t[:, None] * NCH + n[None, :]
    tl.store(ko_ptr + o_out, hk.to(ko_ptr.dtype.element_ty), mask=m2)
    tl.store(vo_ptr + o_out, hv.to(vo_ptr.dtype.element_ty), mask=m2)



# --------------------------------------------------------------------------------------------
# Backward kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_kernel(
    g_ptr, k_ptr, v_ptr, dko_ptr, dvo_ptr,
    dg_ptr, dk_ptr, dv_ptr,
    h0k_ptr, h0v_ptr, dhTk_ptr, dhTv_ptr, dh0k_ptr, dh0v_ptr,
    finc_ptr, BT_F,
    flag_ptr, agg_ptr, inc_ptr,
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
    DEPTH: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    VEC: tl.constexpr,
    EARLY: tl.constexpr,
):
    NCB, NC, c, j, n, b, h, d, mask_d, rows, t, m2 = _claim_tile(flag_ptr, T, H, NCH, D, BT, BD, VEC,
                                                                  True)

    gx = _load_tile(g_ptr, t, b, h, d, m2, sg_t, sg_b, sg_h, sg_d)
    dyk = _load_tile(dko_ptr, t, b, h, d, m2, sdk_t, sdk_b, sdk_h, sdk_d)
    dyv = _load_tile(dvo_ptr, t, b, h, d, m2, sdv_t, sdv_b, sdv_h, sdv_d)
    a, w, e = _gates(gx, m2)

    # ---- reverse-time scan of u_t = a_t (dy_t + u_{t+1}) = a_t dh_t (aggregate first: it
    # unblocks the programs of earlier tiles)
    Al, Uk, Uv = tl.associative_scan((a, a * dyk, a * dyv), 0, _affine_combine, reverse=True)
    flags = flag_ptr + 32
    cl = c.to(tl.int64)
    if c < NC - 1:
        o_agg = agg_ptr + cl * 3 * NCH + n
        _store_row(o_agg, Al, rows, 0, mask_d)
        _store_row(o_agg + NCH, Uk, rows, 0, mask_d)
        _store_row(o_agg + 2 * NCH, Uv, rows, 0, mask_d)
        _publish(flags + c * NCB + j, 1)

    if EARLY >= 1:                               # recompute inputs in flight during the wait
        kx, vx, hk_in, hv_in = _residual_inputs(k_ptr, v_ptr, h0k_ptr, h0v_ptr, finc_ptr,
                                                BT_F, NCH, c, t, b, h, d, n, m2,
                                                mask_d, sk_t, sk_b, sk_h, sk_d,
                                                sv_t, sv_b, sv_h, sv_d, BT, HAS_H0)
    if EARLY == 1:                               # and the recompute itself
        rk, rv = _residuals(kx, vx, hk_in, hv_in, a, w)
    if HAS_DHT:                                  # u_T = d(final state)
        ck = tl.load(dhTk_ptr + n, mask=mask_d & (c == NC - 1), other=0.0)
        cv = tl.load(dhTv_ptr + n, mask=mask_d & (c == NC - 1), other=0.0)
    else:
        ck = tl.zeros([BD], tl.float32)
        cv = tl.zeros([BD], tl.float32)
    ck, cv = _look_back(flags, agg_ptr, inc_ptr, n, NCH, NCB, j, mask_d, c, -1, NC - 1,
                        ck, cv, DEPTH)
    uk = Al * ck[None, :] + Uk
    uv = Al * cv[None, :] + Uv
    o_inc = inc_ptr + cl * 2 * NCH + n
    _store_row(o_inc, uk, rows, 0, mask_d)
    _store_row(o_inc + NCH, uv, rows, 0, mask_d)
    _publish(flags + c * NCB + j, 2)
    if HAS_H0:                                   # d h_{-1} = a_0 dh_0 = u_0
        _store_row(dh0k_ptr + n, uk, rows, 0, mask_d & (c == 0))
        _store_row(dh0v_ptr + n, uv, rows, 0, mask_d & (c == 0))
    if EARLY == 0:
        kx, vx, hk_in, hv_in = _residual_inputs(k_ptr, v_ptr, h0k_ptr, h0v_ptr, finc_ptr,
                                                BT_F, NCH, c, t, b, h, d, n, m2,
                                                mask_d, sk_t, sk_b, sk_h, sk_d,
                                                sv_t, sv_b, sv_h, sv_d, BT, HAS_H0)
    if EARLY != 1:
        rk, rv = _residuals(kx, vx, hk_in, hv_in, a, w)

    _store_grads(dg_ptr, dk_ptr, dv_ptr, t, b, h, d, n, NCH, m2, e, rk, rv, uk, uv,
                 sk_t, sk_b, sk_h, sk_d, GRADS_LIKE_INPUTS)


# --------------------------------------------------------------------------------------------
# Block-size selection: triton.autotune on the GPU, small fixed blocks in the interpreter
# --------------------------------------------------------------------------------------------
_STATUS_ARGS = ["flag_ptr"]


def _cfg(bt, bd, vec, nw, early=None, maxnreg=None):
    """VEC < 8 caps the channels per thread (BD = 32 VEC: one warp spans the block, the warps and
    register repetitions run along time, so the scans run mostly inside each thread); VEC = 8
    leaves Triton's default 16-byte vectors (lanes spread over time as well). ``early`` (backward
    only): recompute the forward states before waiting on the look-back (1), after it (0), or
    after it from ``k, v`` loaded before it (2: the load latency hides behind the wait, for the
    registers of two bf16 tiles instead of two fp32 residual tiles).
    ``maxnreg`` caps the registers per thread (more resident CTAs to wait on the look-back)."""
    kw = {"BT": bt, "BD": bd, "VEC": vec}
    if early is not None:
        kw["EARLY"] = early
    return triton.Config(kw, num_warps=nw, num_stages=1, maxnreg=maxnreg)


def _fwd_configs():
    # The fastest forwards of the H100 sweeps (docs/benchmarks.md), all with BT = 16: BT = 32
    # forward blocks are ~4% faster alone but keep the backward (whose block must be a multiple)
    # off its fastest 16-step blocks, which gain more. The one-warp 16x128 block keeps every time
    # row of a channel in one thread: equal at the anchor, 4% faster at T=65536 (fifth session).
    return [_cfg(16, 64, 2, 2), _cfg(16, 64, 2, 4), _cfg(16, 128, 4, 1)]


def _bwd_configs():
    # The fastest backwards of the same sweeps (forward recompute before / after the look-back:
    # EARLY 1 / 0), the fastest one capped at 96 registers (uncapped it needs 116, 4 CTAs per SM;
    # capped it is spill-free for sm_90 and fits 5, tools/bench/kernel_resources.py), the capped
    # one with the recompute's loads issued before the wait (EARLY = 2, 2% faster), and the
    # one-warp 16x64 block with early loads (time rows in-thread, 272 B of spills with Triton
    # 3.6). Fifth session, GPU-time medians at the anchor, fwd+bwd: 0.611 / 0.599 / 0.589 ms for
    # the last three; the autotuner picks the one-warp block at three of five benchmark shapes, a
    # 96-register one at T=65536. The uncapped EARLY = 2 block (0.638) is not a candidate.
    return [_cfg(16, 64, 2, 4, 0), _cfg(16, 64, 2, 2, 1), _cfg(16, 32, 4, 4, 1), _cfg(32, 32, 4, 4, 1),
            _cfg(16, 64, 2, 4, 0, maxnreg=96), _cfg(16, 64, 2, 4, 2, maxnreg=96), _cfg(16, 64, 2, 1, 2)]


def forward_candidates():
    """Every forward autotuning candidate of both designs (look-back tiles, streams): what the
    first call for a shape chooses from."""
    return _fwd_configs() + _streaming.stream_fwd_configs()


def backward_candidates():
    """Every backward autotuning candidate of both designs."""
    return _bwd_configs() + _streaming.stream_bwd_configs()


_FWD_BT = sorted({c.kwargs["BT"] for c in _fwd_configs()})


def _fits_head(c, D):
    """Blocks never span heads: skip blocks much wider than the head (masked lanes)."""
    return c.kwargs["BD"] <= max(32, triton.next_power_of_2(D))


def _pruner(fallback, backward: bool):
    """``early_config_prune`` for an autotuner: blocks that fit the head and, for a backward, whose
    time block is a multiple of the forward's state rows ``BT_F``; ``fallback(bt_f)`` if none do."""
    def prune(configs, named_args, **kwargs):
        D = named_args["D"] if "D" in named_args else kwargs["D"]
        bt_f = named_args["BT_F"] if backward else 1
        keep = [c for c in configs if _fits_head(c, D) and c.kwargs["BT"] % bt_f == 0]
        return keep or [fallback(bt_f)]
    return prune


_fwd_tuned = triton.autotune(
    configs=_fwd_configs(), key=["D", "T_KEY", "BH_KEY"], reset_to_zero=_STATUS_ARGS,
    do_bench=autotune_bench,
    prune_configs_by={"early_config_prune": _pruner(lambda bt_f: _cfg(64, 32, 1, 4), False)},
)(_fwd_kernel)

_bwd_tuned = triton.autotune(
    configs=_bwd_configs(), key=["D", "T_KEY", "BH_KEY", "BT_F"], reset_to_zero=_STATUS_ARGS,
    do_bench=autotune_bench,
    prune_configs_by={"early_config_prune": _pruner(
        lambda bt_f: _cfg(bt_f, 32, 1, max(4, min(16, bt_f // 8)), 1), True)},
)(_bwd_kernel)

_stream_fwd_tuned = triton.autotune(
    configs=_streaming.stream_fwd_configs(), key=["D", "T_KEY", "BH_KEY"],
    do_bench=autotune_bench,
    prune_configs_by={"early_config_prune": _pruner(lambda bt_f: _streaming._stream_cfg(16, 16, 1, 4),
                                                    False)},
)(_streaming._stream_fwd_kernel)

_stream_bwd_tuned = triton.autotune(
    configs=_streaming.stream_bwd_configs(), key=["D", "T_KEY", "BH_KEY", "BT_F"],
    do_bench=autotune_bench,
    prune_configs_by={"early_config_prune": _pruner(lambda bt_f: _streaming._stream_cfg(bt_f, 16, 1, 4),
                                                    True)},
)(_streaming._stream_bwd_kernel)

# The streaming forward saves its states every 16 steps: every backward block is a multiple.
_STREAM_STATE_ROWS = 16

# Interpreter blocks (BT, BD, VEC; tests may change them): small so that short sequences span
# many tiles.
_INTERPRET_BLOCKS = {"fwd": (8, 8, 1), "bwd": (16, 8, 1)}
# Interpreter: recompute the forward states before (1) or after (0) the backward's look-back.
_INTERPRET_EARLY = 1
# Interpreter: the design each direction runs ("lookback" or "stream"; tests switch it) and the
# streaming blocks (BT, BD, VEC, STAGES).
_INTERPRET_DESIGN = {"fwd": "lookback", "bwd": "lookback"}
_INTERPRET_STREAM_BLOCKS = {"fwd": (8, 8, 1, 2), "bwd": (16, 8, 1, 2)}
# Look-back depth: 0 = greedy (fastest; the carries' fp32 association, hence the last bits, can
# change between runs), K > 0 = deterministic (folds exactly K - 1 aggregates onto the inclusive
# state K tiles back: bitwise reproducible). None: deterministic when
# torch.use_deterministic_algorithms(True) is on, greedy otherwise.
_LOOKBACK_DEPTH = None
_DETERMINISTIC_DEPTH = 8


def _lookback_depth() -> int:
    if _LOOKBACK_DEPTH is not None:
        return int(_LOOKBACK_DEPTH)
    return _DETERMINISTIC_DEPTH if torch.are_deterministic_algorithms_enabled() else 0
# Benchmarks only: launch kwargs to use instead of the autotuner's, {"fwd": {...}, "bwd": {...}}
# (with a "STAGES" entry: the streaming design).
_FORCE_CONFIG: dict = {"fwd": None, "bwd": None}
# Launch kwargs chosen per shape/dtype key (the faster design's autotuned block).
_TUNED: dict = {}
# Benchmarks only: the compiled kernel of the last "fwd" / "bwd" launch (register counts, spills).
_LAST_COMPILED: dict = {}


def is_streaming(meta: dict) -> bool:
    """Whether launch kwargs belong to the streaming design (:mod:`.streaming`)."""
    return "STAGES" in meta


def _new_output(shape, dtype, device):
    """Allocation hook for outputs and gradients (GPU tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _key_buckets(T: int, BH: int) -> Tuple[int, int]:
    return triton.next_power_of_2(max(T, 1)), triton.next_power_of_2(max(BH, 1))


def _strides(x: torch.Tensor):
    return tuple(x.stride())


def _status(n_chunks: int, nch: int, D: int, device):
    """Look-back buffers: int32 flags [counter, pad to 32][n_chunks x channel blocks] (zeroed),
    fp32 aggregates [n_chunks x 3 x NCH] and inclusive states [n_chunks x 2 x NCH]. Separate
    allocations: the forward's inclusive states are kept for the backward, the rest is freed."""
    n_blocks = (nch // D) * triton.cdiv(D, 8)          # every block is at least 8 channels wide
    flags = torch.zeros(32 + n_chunks * n_blocks, dtype=torch.int32, device=device)
    agg = torch.empty(n_chunks * 3 * nch, dtype=torch.float32, device=device)
    inc = torch.empty(n_chunks * 2 * nch, dtype=torch.float32, device=device)
    return flags, agg, inc


def _grid(T, B, H, D):
    def grid(m):
        return (triton.cdiv(T, m["BT"]) * B * H * triton.cdiv(D, m["BD"]),)
    return grid


def _launch_kwargs(config: triton.Config) -> dict:
    """An autotuning candidate as launch kwargs (meta-parameters, warps, stages, register cap)."""
    kw = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg is not None:
        kw["maxnreg"] = config.maxnreg
    return kw


def _interpret_meta(direction: str) -> dict:
    """Launch kwargs under the interpreter: the fixed small blocks of the design that
    ``_INTERPRET_DESIGN`` names for ``direction`` ("fwd" or "bwd")."""
    if _INTERPRET_DESIGN[direction] == "stream":
        bt, bd, vec, stages = _INTERPRET_STREAM_BLOCKS[direction]
        return {"BT": bt, "BD": bd, "VEC": vec, "STAGES": stages}
    bt, bd, vec = _INTERPRET_BLOCKS[direction]
    meta = {"BT": bt, "BD": bd, "VEC": vec}
    if direction == "bwd":
        meta["EARLY"] = _INTERPRET_EARLY
    return meta


def _select_design(key, options):
    """Launch kwargs for ``key``: each design's block tuned once by ``triton.autotune``, then the
    two winners timed against each other (GPU time, the host's launch time hidden: :mod:`..gpu_time`;
    with the allocations and flag zeroing a real call makes) and the faster one kept.
    ``options``: ``(tuned, run)`` pairs, ``run(kernel, meta)`` launching ``kernel`` (the autotuner
    with ``{}``, or a plain kernel)."""
    meta = _TUNED.get(key)
    if meta is None:
        best = None
        for tuned, run in options:
            run(tuned, {})
            cand = _launch_kwargs(tuned.best_config)
            ms = gpu_median(lambda run=run, fn=tuned.fn, cand=cand: run(fn, cand), calls=20,
                            warmup=3)
            if best is None or ms < best[0]:
                best = (ms, cand)
        meta = _TUNED[key] = best[1]
    return meta


def _forward(g, k, v, h0k, h0v, output_final_state):
    """Launch the forward. Returns ``k~, v~``, the final states (or None), the fp32 states kept
    for the backward and the number of steps between them (``BT_F``)."""
    T, B, H, D = g.shape
    nch = B * H * D
    dev = g.device
    ko = _new_output((T, B, H, D), k.dtype, dev)
    vo = _new_output((T, B, H, D), v.dtype, dev)
    hTk = hTv = None
    if output_final_state:
        hTk = _new_output((B, H, D), torch.float32, dev)
        hTv = _new_output((B, H, D), torch.float32, dev)
    t_key, bh_key = _key_buckets(T, B * H)
    has_h0 = h0k is not None
    dummy = ko
    head = (g, k, v, ko, vo, h0k if has_h0 else dummy, h0v if has_h0 else dummy,
            hTk if output_final_state else dummy, hTv if output_final_state else dummy)
    tail = (T, H, nch, *_strides(g), *_strides(k), *_strides(v), t_key, bh_key)
    common = {"D": D, "HAS_H0": has_h0, "STORE_FINAL": output_final_state}

    def run_lookback(kernel, meta):
        bt_f = meta.get("BT", min(_FWD_BT))          # autotuner: sized for its smallest block
        flags, agg, inc = _status(triton.cdiv(T, bt_f), nch, D, dev)
        compiled = kernel[_grid(T, B, H, D)](*head, flags, agg, inc, *tail, **common,
                                             DEPTH=_lookback_depth(), **meta)
        return compiled, inc, bt_f

    def run_stream(kernel, meta):
        bt_f = min(meta.get("BT", _STREAM_STATE_ROWS), _STREAM_STATE_ROWS)
        inc = torch.empty(triton.cdiv(T, bt_f) * 2 * nch, dtype=torch.float32, device=dev)
        compiled = kernel[_streaming.stream_grid(B, H, D)](*head, inc, *tail, **common, SAVE=bt_f,
                                                           **meta)
        return compiled, inc, bt_f

    if _interpreting():
        meta = _interpret_meta("fwd")
    elif _FORCE_CONFIG["fwd"] is not None:
        meta = dict(_FORCE_CONFIG["fwd"])
    else:
        key = ("fwd", D, t_key, bh_key, g.dtype, k.dtype, v.dtype, has_h0, output_final_state,
               _lookback_depth(), str(dev))
        meta = _select_design(key, [(_fwd_tuned, run_lookback), (_stream_fwd_tuned, run_stream)])
    if is_streaming(meta):
        _LAST_COMPILED["fwd"], inc, bt_f = run_stream(_streaming._stream_fwd_kernel, meta)
    else:
        _LAST_COMPILED["fwd"], inc, bt_f = run_lookback(_fwd_kernel, meta)
    return ko, vo, hTk, hTv, inc, bt_f


def _backward(g, k, v, dko, dvo, h0k, h0v, dhTk, dhTv, finc, bt_f, grads=None):
    """Launch the backward from the forward's kept states ``finc`` (one row per ``bt_f`` steps).
    ``grads``: ``(dg, dk, dv)`` to write, with the strides of ``g, k, v`` (checked by the caller);
    new contiguous tensors otherwise."""
    T, B, H, D = g.shape
    nch = B * H * D
    dev = g.device
    like_inputs = grads is not None
    if like_inputs:
        dg, dk, dv = grads
    else:
        dg = _new_output((T, B, H, D), g.dtype, dev)
        dk = _new_output((T, B, H, D), k.dtype, dev)
        dv = _new_output((T, B, H, D), v.dtype, dev)
    has_h0 = h0k is not None
    has_dht = dhTk is not None
    dh0k = dh0v = None
    if has_h0:
        dh0k = _new_output((B, H, D), torch.float32, dev)
        dh0v = _new_output((B, H, D), torch.float32, dev)
    t_key, bh_key = _key_buckets(T, B * H)
    dummy = dg
    head = (g, k, v, dko, dvo, dg, dk, dv,
            h0k if has_h0 else dummy, h0v if has_h0 else dummy,
            dhTk if has_dht else dummy, dhTv if has_dht else dummy,
            dh0k if has_h0 else dummy, dh0v if has_h0 else dummy, finc, bt_f)
    tail = (T, H, nch, *_strides(g), *_strides(k), *_strides(v), *_strides(dko), *_strides(dvo),
            t_key, bh_key)
    common = {"D": D, "HAS_H0": has_h0, "HAS_DHT": has_dht, "GRADS_LIKE_INPUTS": like_inputs}

    def run_lookback(kernel, meta):
        # every backward block allowed by the pruning is a multiple of the forward's state rows
        flags, agg, inc = _status(triton.cdiv(T, meta.get("BT", bt_f)), nch, D, dev)
        return kernel[_grid(T, B, H, D)](*head, flags, agg, inc, *tail, **common,
                                         DEPTH=_lookback_depth(), **meta)

    def run_stream(kernel, meta):
        return kernel[_streaming.stream_grid(B, H, D)](*head, *tail, **common, **meta)

    if _interpreting():
        meta = _interpret_meta("bwd")
    elif _FORCE_CONFIG["bwd"] is not None:
        meta = dict(_FORCE_CONFIG["bwd"])
        if not is_streaming(meta):
            meta.setdefault("EARLY", 1)
    else:
        key = ("bwd", D, t_key, bh_key, bt_f, g.dtype, k.dtype, v.dtype, dko.dtype, dvo.dtype,
               has_h0, has_dht, like_inputs, _lookback_depth(), str(dev))
        meta = _select_design(key, [(_bwd_tuned, run_lookback), (_stream_bwd_tuned, run_stream)])
    if meta["BT"] % bt_f != 0:
        raise ValueError(f"backward block {meta['BT']} must be a multiple of the forward's state "
                         f"rows {bt_f}")
    if is_streaming(meta):
        _LAST_COMPILED["bwd"] = run_stream(_streaming._stream_bwd_kernel, meta)
    else:
        _LAST_COMPILED["bwd"] = run_lookback(_bwd_kernel, meta)
    return dg, dk, dv, dh0k, dh0v


class _FusedGatedRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, k, v, h0k, h0v, output_final_state, grad_destination):
        ko, vo, hTk, hTv, inc, bt_f = _forward(g, k, v, h0k, h0v, output_final_state)
        ctx.save_for_backward(g, k, v, h0k, h0v, inc)
        ctx.bt_f = bt_f
        ctx.grad_destination = grad_destination
        return ko, vo, hTk, hTv

    @staticmethod
    def backward(ctx, dko, dvo, dhTk, dhTv):
        g, k, v, h0k, h0v, inc = ctx.saved_tensors
        if dko is None:
            dko = torch.zeros_like(k)
        if dvo is None:
            dvo = torch.zeros_like(v)
        if (dhTk is None) != (dhTv is None):
            dhTk = torch.zeros_like(dhTv) if dhTk is None else dhTk
            dhTv = torch.zeros_like(dhTk) if dhTv is None else dhTv
        if dhTk is not None:
            dhTk = dhTk.float().contiguous()
            dhTv = dhTv.float().contiguous()
        grads = claim_grad_destination(ctx.grad_destination, g, k, v)
        dg, dk, dv, dh0k, dh0v = _backward(g, k, v, dko, dvo, h0k, h0v, dhTk, dhTv, inc, ctx.bt_f, grads)
        return dg, dk, dv, dh0k, dh0v, None, None


def fused_gated_recurrence(
    g: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    grad_destination: Optional[GradDestination] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[State]]:
    """Fused Triton RAT+ recurrence; same contract as ``naive_gated_recurrence``.

    ``g, k, v``: ``[T, B, H, D]`` (any strides, e.g. views of the fused projection output; no
    copies are made), fp32/bf16/fp16. Returns ``(k~, v~, final_state)``: new contiguous
    ``[T, B, H, D]`` tensors in ``k``'s / ``v``'s dtype and, if ``output_final_state``, the fp32
    ``(k_T, v_T)`` of shape ``[B, H, D]``. ``initial_state = (k0, v0)``, each ``[B, H, D]``.
    Differentiable in ``g, k, v`` and the initial state.

    ``grad_destination``: optional callable, called once by the backward, returning ``(dg, dk,
    dv)`` tensors (each with its input's shape, dtype and strides) that the kernel writes the
    gradients into and returns, or None to decline; used when ``g, k, v`` share their strides.
    The RAT+ layer passes the slots of its fused projection's gradient buffer, so no copy
    assembles that gradient afterwards.

    Reproducibility: by default the carries between time tiles are combined in whatever order the
    look-back finds them (fastest; last-bit differences between runs). Under
    ``torch.use_deterministic_algorithms(True)`` (or with ``_LOOKBACK_DEPTH`` set > 0) the order is
    fixed and results are bitwise reproducible, about 25% slower (the streaming design is
    always deterministic). Which design and block runs is chosen by timing, once per shape and
    process: repeated calls reproduce bitwise, two processes only if they chose the same kernels
    (``_TUNED`` holds the choices).
    """
    if not (g.shape == k.shape == v.shape) or g.dim() != 4:
        raise ValueError(f"g, k, v must share one [T, B, H, D] shape, got {tuple(g.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (g.device == k.device == v.device):
        raise ValueError("g, k, v must be on one device")
    if g.device.type != "cuda" and not _interpreting():
        raise RuntimeError("fused_gated_recurrence needs CUDA tensors (or TRITON_INTERPRET=1); "
                           "use chunked_gated_recurrence on CPU")
    for x in (g, k, v):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"unsupported dtype {x.dtype}")
    T, B, H, D = g.shape
    h0k = h0v = None
    if initial_state is not None:
        k0, v0 = initial_state
        if tuple(k0.shape) != (B, H, D) or tuple(v0.shape) != (B, H, D):
            raise ValueError(f"initial_state tensors must be [B, H, D] = {(B, H, D)}")
        h0k = k0.to(device=g.device, dtype=torch.float32).contiguous()
        h0v = v0.to(device=g.device, dtype=torch.float32).contiguous()
    if T == 0 or B * H * D == 0:
        ko = k.new_empty(k.shape)
        vo = v.new_empty(v.shape)
        if not output_final_state:
            return ko, vo, None
        if h0k is None:
            z = torch.zeros(B, H, D, dtype=torch.float32, device=g.device)
            return ko, vo, (z, z.clone())
        return ko, vo, (h0k, h0v)
    if g.device.type == "cuda":
        with torch.cuda.device(g.device):
            ko, vo, hTk, hTv = _FusedGatedRecurrence.apply(g, k, v, h0k, h0v, bool(output_final_state),
                                                           grad_destination)
    else:
        ko, vo, hTk, hTv = _FusedGatedRecurrence.apply(g, k, v, h0k, h0v, bool(output_final_state),
                                                       grad_destination)
    final = (hTk, hTv) if output_final_state else None
    return ko, vo, final
