"""Streaming Triton kernels for the RAT+ recurrence: one program per channel block walks the
whole sequence, tile by tile, carrying the state in registers.

The look-back kernels (``fused``) give every (time tile, channel block) its own program and pass
the state between tiles through memory; they fill the GPU at any length but every tile pays for
publishing and waiting. When there are enough channels (B x H x D large against the GPU, as at
B=4, 16x128 heads) a program per channel block alone fills it, and the carry costs nothing:

* forward: for each ``[BT, BD]`` tile in time order: load ``g, k, v``, scan the affine maps
  inside the tile (``tl.associative_scan``), apply the carried state, write ``k~, v~``, keep the
  tile's last row as the next carry and store it (fp32) as the tile's inclusive end state;
* backward: the same walk in reverse time on ``u_t = a_t (dy_t + u_{t+1})``, recomputing the
  forward states of each tile from ``k, v`` and the stored end state of the tile before it.

Loads of the next tiles do not depend on the carry, so the loop pipelines (``num_stages``).
The traffic is the look-back kernels' (forward: g, k, v in, k~, v~ out; backward: g, k, v,
dk~, dv~ in, dg, dk, dv out) plus one fp32 row per tile, and the result is deterministic.

Tile-end states use the look-back kernels' layout (inclusive rows after ``NC_ALLOC_F`` rows of
aggregates; the streaming forward stores no aggregates and passes 0), so the streaming backward
accepts either forward's states and the choice between the two pipelines (``fused``) can be
made per direction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import _affine_combine, _gates, _load_tile, _recompute_residuals, _tile_channels

__all__ = ["stream_forward", "stream_backward"]


@triton.jit
def _row(x, rows, r: tl.constexpr):
    """Row ``r`` of the [BT, BD] tile ``x`` as a [BD] vector (the carry between tiles)."""
    return tl.sum(tl.where(rows[:, None] == r, x, 0.0), 0)


@triton.jit
def _fwd_stream_kernel(
    g_ptr, k_ptr, v_ptr, ko_ptr, vo_ptr,
    h0k_ptr, h0v_ptr, hTk_ptr, hTv_ptr, inc_ptr,
    T, H, NCH,
    sg_t, sg_b, sg_h, sg_d,
    sk_t, sk_b, sk_h, sk_d,
    sv_t, sv_b, sv_h, sv_d,
    T_KEY, BH_KEY,
    D: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    VEC: tl.constexpr,
):
    n, b, h, d, mask_d = _tile_channels(tl.program_id(0), H, D, BD, VEC)
    rows = tl.arange(0, BT)
    if HAS_H0:
        hk = tl.load(h0k_ptr + n, mask=mask_d, other=0.0)
        hv = tl.load(h0v_ptr + n, mask=mask_d, other=0.0)
    else:
        hk = tl.zeros([BD], tl.float32)
        hv = tl.zeros([BD], tl.float32)
    for i in range(0, (T + BT - 1) // BT):
        c = i + tl.full([], 0, tl.int64)         # a tensor also in the interpreter
        t = c * BT + rows
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
        hk = _row(yk, rows, BT - 1)
        hv = _row(yv, rows, BT - 1)
        o_inc = inc_ptr + c * 2 * NCH + n
        tl.store(o_inc, hk, mask=mask_d)
        tl.store(o_inc + NCH, hv, mask=mask_d)
    if STORE_FINAL:
        tl.store(hTk_ptr + n, hk, mask=mask_d)
        tl.store(hTv_ptr + n, hv, mask=mask_d)


@triton.jit(do_not_specialize=["NC_ALLOC_F"])
def _bwd_stream_kernel(
    g_ptr, k_ptr, v_ptr, dko_ptr, dvo_ptr,
    dg_ptr, dk_ptr, dv_ptr,
    h0k_ptr, h0v_ptr, dhTk_ptr, dhTv_ptr, dh0k_ptr, dh0v_ptr,
    fval_ptr, NC_ALLOC_F, BT_F,
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
):
    n, b, h, d, mask_d = _tile_channels(tl.program_id(0), H, D, BD, VEC)
    rows = tl.arange(0, BT)
    if HAS_DHT:                                  # u_T = d(final state)
        ck = tl.load(dhTk_ptr + n, mask=mask_d, other=0.0)
        cv = tl.load(dhTv_ptr + n, mask=mask_d, other=0.0)
    else:
        ck = tl.zeros([BD], tl.float32)
        cv = tl.zeros([BD], tl.float32)
    NC = (T + BT - 1) // BT
    for i in range(0, NC):
        c = (NC - 1 - i) + tl.full([], 0, tl.int64)   # last time tile first
        t = c * BT + rows
        m2 = (t < T)[:, None] & mask_d[None, :]
        gx = _load_tile(g_ptr, t, b, h, d, m2, sg_t, sg_b, sg_h, sg_d)
        dyk = _load_tile(dko_ptr, t, b, h, d, m2, sdk_t, sdk_b, sdk_h, sdk_d)
        dyv = _load_tile(dvo_ptr, t, b, h, d, m2, sdv_t, sdv_b, sdv_h, sdv_d)
        a, w, e = _gates(gx, m2)
        Al, Uk, Uv = tl.associative_scan((a, a * dyk, a * dyv), 0, _affine_combine, reverse=True)
        uk = Al * ck[None, :] + Uk
        uv = Al * cv[None, :] + Uv
        rk, rv = _recompute_residuals(k_ptr, v_ptr, h0k_ptr, h0v_ptr, fval_ptr, NC_ALLOC_F, BT_F,
                                      NCH, c, t, b, h, d, n, m2, mask_d, a, w,
                                      sk_t, sk_b, sk_h, sk_d, sv_t, sv_b, sv_h, sv_d,
                                      BT, HAS_H0)
        # dk = (1 - a) dh = e u;  dg = (1 - a) sum_s (h_t - x_t) dh_t = e sum_s (h_t - x_t) u_t
        o_out = t[:, None] * NCH + n[None, :]
        tl.store(dg_ptr + o_out, (e * (rk * uk + rv * uv)).to(dg_ptr.dtype.element_ty), mask=m2)
        tl.store(dk_ptr + o_out, (e * uk).to(dk_ptr.dtype.element_ty), mask=m2)
        tl.store(dv_ptr + o_out, (e * uv).to(dv_ptr.dtype.element_ty), mask=m2)
        ck = _row(uk, rows, 0)
        cv = _row(uv, rows, 0)
    if HAS_H0:                                   # d h_{-1} = a_0 dh_0 = u_0
        tl.store(dh0k_ptr + n, ck, mask=mask_d)
        tl.store(dh0v_ptr + n, cv, mask=mask_d)


# --------------------------------------------------------------------------------------------
# Launch configurations: triton.autotune on the GPU (the kernels only overwrite their outputs,
# so the autotuner's repeated runs are harmless), fixed small blocks in the interpreter
# --------------------------------------------------------------------------------------------
def _cfg(bt, bd, vec, nw, stages):
    """``BD = 32 VEC nw``: the warps lie along the channels, so every thread owns whole time
    columns and the scans run inside threads; smaller BD puts lanes along time too."""
    return triton.Config({"BT": bt, "BD": bd, "VEC": vec}, num_warps=nw, num_stages=stages)


# Candidates (untimed before the fourth session's GPU run; the autotuner decides per shape):
# narrow channel blocks give many programs (B=4, 16x128 heads: 256 blocks of 32 channels),
# long tiles many independent loads per program.
STREAM_CONFIGS = [_cfg(64, 32, 1, 4, 1), _cfg(128, 32, 1, 8, 1), _cfg(64, 16, 1, 2, 1),
                  _cfg(64, 32, 1, 8, 1), _cfg(128, 32, 1, 4, 1), _cfg(32, 32, 1, 4, 1),
                  _cfg(64, 64, 2, 4, 1), _cfg(128, 16, 1, 4, 1)]


def _fits_head(c, D):
    return c.kwargs["BD"] <= max(16, triton.next_power_of_2(D))


def _prune_fwd(configs, named_args, **kwargs):
    D = named_args["D"] if "D" in named_args else kwargs["D"]
    return [c for c in configs if _fits_head(c, D)] or [_cfg(64, 16, 1, 1, 2)]


def _prune_bwd(configs, named_args, **kwargs):
    D = named_args["D"] if "D" in named_args else kwargs["D"]
    bt_f = named_args["BT_F"]
    keep = [c for c in configs if _fits_head(c, D) and c.kwargs["BT"] % bt_f == 0]
    return keep or [_cfg(bt_f, 16, 1, 1, 2)]


_fwd_tuned = triton.autotune(configs=STREAM_CONFIGS, key=["D", "T_KEY", "BH_KEY"],
                             prune_configs_by={"early_config_prune": _prune_fwd})(_fwd_stream_kernel)
_bwd_tuned = triton.autotune(configs=STREAM_CONFIGS, key=["D", "T_KEY", "BH_KEY", "BT_F"],
                             prune_configs_by={"early_config_prune": _prune_bwd})(_bwd_stream_kernel)


# Benchmarks only: the launch configuration of the last streaming launch per direction.
LAST_CONFIG: dict = {}


def _describe(cfg: triton.Config) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _grid(B, H, D):
    return lambda m: (B * H * triton.cdiv(D, m["BD"]),)


def stream_forward(g, k, v, ko, vo, h0k, h0v, hTk, hTv, meta, t_key, bh_key, strides):
    """Run the streaming forward into ``ko, vo`` (and ``hTk, hTv`` if given). ``meta``: launch
    kwargs (BT, BD, VEC, num_warps, num_stages) or None for the autotuner. Returns
    ``(inclusive end states [n_tiles x 2 x NCH] fp32, BT, compiled kernel)``."""
    T, B, H, D = g.shape
    nch = B * H * D
    has_h0, final = h0k is not None, hTk is not None
    bt = meta["BT"] if meta is not None else min(c.kwargs["BT"] for c in STREAM_CONFIGS)
    # sized for the smallest tile: the autotuner may pick any
    inc = torch.empty(triton.cdiv(T, bt) * 2 * nch, dtype=torch.float32, device=g.device)
    args = (g, k, v, ko, vo, h0k if has_h0 else ko, h0v if has_h0 else ko,
            hTk if final else ko, hTv if final else ko, inc, T, H, nch, *strides, t_key, bh_key)
    kw = dict(D=D, HAS_H0=has_h0, STORE_FINAL=final)
    if meta is None:
        compiled = _fwd_tuned[_grid(B, H, D)](*args, **kw)
        meta = _describe(_fwd_tuned.best_config)
        bt = meta["BT"]
    else:
        compiled = _fwd_stream_kernel[_grid(B, H, D)](*args, **kw, **meta)
    LAST_CONFIG["fwd"] = meta
    return inc, bt, compiled


def stream_backward(g, k, v, dko, dvo, dg, dk, dv, h0k, h0v, dhTk, dhTv, dh0k, dh0v,
                    fvals, n_alloc_f, bt_f, meta, t_key, bh_key, strides):
    """Run the streaming backward into ``dg, dk, dv`` (and ``dh0k, dh0v`` if given) from either
    forward's tile-end states ``fvals`` (``n_alloc_f`` aggregate rows first, tiles of ``bt_f``).
    Returns the compiled kernel."""
    T, B, H, D = g.shape
    has_h0, has_dht = h0k is not None, dhTk is not None
    args = (g, k, v, dko, dvo, dg, dk, dv,
            h0k if has_h0 else dg, h0v if has_h0 else dg, dhTk if has_dht else dg,
            dhTv if has_dht else dg, dh0k if has_h0 else dg, dh0v if has_h0 else dg,
            fvals, n_alloc_f, bt_f, T, H, B * H * D, *strides, t_key, bh_key)
    kw = dict(D=D, HAS_H0=has_h0, HAS_DHT=has_dht)
    if meta is None:
        compiled = _bwd_tuned[_grid(B, H, D)](*args, **kw)
        LAST_CONFIG["bwd"] = _describe(_bwd_tuned.best_config)
        return compiled
    if meta["BT"] % bt_f != 0:
        raise ValueError(f"backward block {meta['BT']} must be a multiple of the forward block {bt_f}")
    LAST_CONFIG["bwd"] = meta
    return _bwd_stream_kernel[_grid(B, H, D)](*args, **kw, **meta)
