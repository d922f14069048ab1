"""Fused Triton RAT+ dilated (sparse) attention: forward and backward.

This module is the host side (launch configurations, first-use choices, the autograd Function);
the kernels are in :mod:`.forward_kernels` and :mod:`.backward_kernels`, their shared helpers in
:mod:`.tiles`. The algorithm they implement is described here.

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
tiles ``g in [0, n_far)``, then over the contiguous near tiles covering ``[n0 - W, n0 + BM)``;
only those key tiles are visited (with ``W = 0`` the band is the diagonal, done elementwise).
Stores the output (input dtype, new contiguous ``[T, B, H, Dh]``) and the natural-log
log-sum-exp (fp32 ``[B, H, T]``). Programs run from the last query block to
the first, so the blocks with the most far keys start first.

Backward: three kernels plus a tiny finalisation
------------------------------------------------
``delta_t = sum(o_t * do_t)`` (minus ``dlse_t``) is computed by the first kernel and stored.

1. **dq, query-major** (one program per query block): ``dq`` from the gathered far tiles and the
   band tiles, in registers, stored once (no atomics). With ``W = 0`` the band is the diagonal:
   it is done elementwise (one score per row, no matrix product) and this program also produces
   the band ``dk, dv`` of its own keys, so kernel 2 is skipped.
2. **band dk/dv, key-major** (``W > 0``; one program per key block): queries ``[n0, n0+BLK+W)``.
3. **far dk/dv, key-major over the gathered global keys**: one program per (tile of ``BG``
   global keys, segment of queries, batch x head) accumulates ``dk, dv`` of its keys in
   registers over its query segment and adds them *once* into a compact fp32 buffer
   ``[2, B*H, NG, Dh]`` (NG = number of global keys, about ``P + T/D``). The band contributions
   of global keys (kernels 1/2) go to the same buffer, and a final kernel writes the global rows
   of ``dk, dv`` from it (each rounded once); other rows are stored directly by their owner.

Why a key-major far pass with few atomics, rather than atomics from the query-major pass: a
global key receives gradient from every later query block. The first version added each query
block's far contributions to the buffer with fp32 atomics straight from kernel 1 (the far ``dS``
and ``P`` were already in registers there). On the H100 that kernel needed the ``dq`` accumulator
*and* two ``[BG, Dh]`` fp32 partials live at once: 255 registers with 14-144 spilled, one CTA per
SM, and 0.39-0.48 ms of backward at B=4, T=4096, D=64 (tools/bench sweep, 2026-11-23). The
key-major pass recomputes the far scores (two extra products per far tile) and rereads
``q, do`` per segment, but each kernel keeps one accumulator pair; the query segmentation
(``PROGS_PER_SM``) keeps the GPU full while bounding the atomics to
``2 * n_segments * NG * Dh`` per head. Summation order of the global rows' fp32 atomics is not
deterministic (at the level of fp32 rounding, like flash-attention's ``dq``).

Single-pass backward for ``W = 0`` (``_bwd_w0_kernel``, an alternative to kernels 1 and 3 when
the global keys fit one tile, e.g. T=4096 with D=64; on the GPU the first W = 0 backward of each
shape times the alternatives and keeps the fastest, see ``W0_BACKWARD``): one program per
(query segment, batch x head) holds every global key of its head and their ``dk, dv``
accumulators, walks its query blocks once and adds the accumulators into the compact buffer once.
It takes ``delta_t = sum_j P_tj dP_tj`` from the scores in registers instead of ``sum(o_t do_t)``,
so ``o`` is not read: 7 tensor passes (q, k, v, do in; dq, dk, dv out) against the split
backward's 8 plus the far pass's reread of q and do. The products are written key-major
(``[global keys, queries]``) so that no operand is replicated across warps, and the default
launch is one warpgroup: at 8 warps Triton holds the 64-row score tiles twice (see
``_W0_CONFIG``).

Single-pass forward for ``W = 0`` (``_fwd_w0_kernel``, same condition as the single-pass backward;
chosen on first use against the per-block forward, see ``W0_FORWARD``): one program per (query
segment, batch x head) loads the global keys of its head once and walks its query blocks with the
row tiles prefetched by the software pipeliner; every allowed key of a row is in one iteration, so
the softmax needs no running rescale.

TMA row tiles: a launch configuration may set ``TMA`` (1: descriptors encoded on the host; "device":
built in the kernel). Contiguous row tiles (q, o, do, the band's and the diagonal's k, v) are then
read as boxes of the 2-D ``[T, columns]`` view of the ``[T, B, H, Dh]`` tensor (row stride
``stride_t``; the (b, h) tile starts at column ``b * stride_b + h * stride_h``): no address
registers, asynchronous loads the software pipeliner can prefetch, rows past T read as zeros.
Used only where every tensor allows it (``_row_tiles_ok``: 16-bit, Dh in {16..128}, aligned,
non-overlapping rows); gathered global keys stay pointer loads. The single-pass kernels may also
store their outputs as such boxes (``TMA_STORE``: host descriptors, rows past T dropped).

The log-sum-exp output is differentiable: its gradient enters as ``delta_t - dlse_t``.

Under ``TRITON_INTERPRET=1`` (CPU) the same kernels run through Triton's interpreter with small
blocks (``_INTERPRET_BLOCKS``), so short sequences span several tiles of every kind.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from .._env import interpreting as _interpreting
from ..first_use import FirstUseChoice
from .backward_kernels import (_bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_far_kernel, _bwd_global_kernel,
                               _bwd_w0_kernel)
from .forward_kernels import _fwd_kernel, _fwd_w0_kernel
from .naive import validate_pattern

__all__ = ["fused_dilated_attention"]

_LOG2E = 1.4426950408889634

# Interpreter blocks: small, so that short test sequences span several tiles of every kind.
_INTERPRET_BLOCKS = {"fwd": dict(BM=16, BN=16, BG=16), "bwd": dict(BLK=16, BN1=16, BM2=16, BG=16)}
# Optional override of the launch configuration (tests and the benchmark's sweep).
_OVERRIDE: dict = {"fwd": None, "bwd": None}
# Launch configurations of the single-pass W = 0 backward (bf16/fp16 on the GPU; None: the split
# backward only), candidates of the first-use choice W0_BACKWARD (below) where the global keys fit
# one tile: at T=16384 with D=64 they do not. History at the anchor (B=4, T=4096, 16x128 heads,
# D=64; profiler GPU time of forward+backward): 0.461 ms with BLK=32 / 8 warps (fourth session),
# 0.429 with FOLD_DIAG (the global rows' diagonal rides in the key-major products instead of
# per-block atomics, seventh session), against 0.476-0.500 for the split backward.
# One warpgroup (tenth session): Triton lays a dot whose result feeds another dot out with all
# warps along M (warpsPerCTA [8, 1] at 8 warps, its flash-attention heuristic), so the 64-row
# score tiles ([NGC, BLK]) were held twice and both warpgroups computed the same products and
# element-wise work. At 4 warps each tile is computed once; the global-key accumulators then take
# twice the registers per thread, so BLK=16 (2-28 B of spills per thread, 2 CTAs per SM): 0.360
# vs 0.423 ms with pointer loads.
_W0_CONFIG: Optional[dict] = dict(BLK=16, NGC_MAX=64, num_warps=4, num_stages=1, PROGS_PER_SM=8,
                                  FOLD_DIAG=True)
# The same single pass reading q, k, v, do as host-made TMA tiles, prefetched LOOP_STAGES - 1
# query blocks ahead by the software pipeliner, and with DQ_T and TMA_STORE (dq as a wgmma
# product, dq / dk / dv stored as TMA tiles): 0.300 ms forward+backward at the anchor, against
# 0.323 with TMA_STORE alone, 0.328 with DQ_T alone, 0.339 with neither (3 stages; 4 stages:
# 0.302 / 0.330 / 0.331 / 0.338; with neither, 0.352 / 0.385 with 16 / 4 programs per SM) and
# 0.402 for the 8-warp BLK=32 configuration of the seventh to ninth sessions (tenth session). Its
# seven host descriptors cost host time on every launch (tools/bench/launch_overhead.py), which
# the first-use choice (by GPU time) does not count.
_W0_TMA_CONFIG: Optional[dict] = dict(BLK=16, NGC_MAX=64, num_warps=4, num_stages=1, LOOP_STAGES=3,
                                      PROGS_PER_SM=8, FOLD_DIAG=True, DQ_T=True, TMA_STORE=True)
# The single-pass W = 0 forward (``_fwd_w0_kernel``; bf16/fp16 on the GPU), a candidate of the
# first-use choice W0_FORWARD where the global keys fit one tile of NGC_MAX rows; None: per-block
# forward only. TMA row tiles prefetched LOOP_STAGES - 1 query blocks ahead (pointer loads where
# the inputs do not allow TMA). H100, B=4, T=4096, D=64 (ninth session, profiler kernel time):
# 0.0997 ms with 4 programs per SM (224 registers, 139 KiB shared memory: one CTA per SM),
# 0.1033 with 2, 0.1048 with 1, 0.1169 with 2 stages or 8 warps, against 0.1051 for the
# per-block forward. Both forwards move their 268 MB (q, k, v in, o out) at about 2.3 TB/s under
# Nsight Compute (69% of DRAM peak at its locked clocks): the forward is at its memory floor.
_FWD_W0_CONFIG: Optional[dict] = dict(BLK=64, NGC_MAX=64, num_warps=4, num_stages=1, LOOP_STAGES=3,
                                      PROGS_PER_SM=4, TMA=True)
# A dq-kernel configuration for W = 0 that compiles for sm_90 without spills (205 registers, 2 CTAs
# per SM; the default spills): a candidate of the same first-use choice. Measured on the H100 it
# wins at T=4096, D=64 over the default dq tiling (0.357 vs 0.386 ms backward) and loses at D=16
# and at T=16384 (e.g. 4.76 vs 3.38 ms at T=16384, D=16), hence a choice, not a default.
_DQ_W0_CONFIG: Optional[dict] = dict(BLK=32, BN1=32, BG=32, num_warps=4, num_stages=3)
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
    # TMA row tiles (where the inputs allow them): on an H100 at B=4, T=4096, 16x128 heads
    # (seventh session, profiler kernel time) 0.105 vs 0.122 ms at D=64/W=0 and 0.196 vs 0.218
    # ms at D=16/W=256/P=4; 168 / 134 registers instead of 207 / 162
    return dict(BM=64, BN=32, BG=32, num_warps=4, num_stages=3, TMA=True, w0=_FWD_W0_CONFIG)


def _bwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Launch configurations of the backward kernels: ``dq`` (query-major), ``dkdv`` (key-major
    band) and ``far`` (key-major gathered global keys; PROGS_PER_SM sets how finely the queries
    are segmented); for ``W = 0`` also ``w0``, the single-pass kernel that replaces them when the
    global keys fit one tile of ``NGC_MAX`` rows, and ``dq_w0``, another ``dq`` configuration
    (``None``: no such candidate)."""
    if _OVERRIDE["bwd"] is not None:
        return dict(_OVERRIDE["bwd"])
    if _interpreting():
        b = _INTERPRET_BLOCKS["bwd"]
        x = dict(num_warps=4, num_stages=1)
        return dict(dq=dict(BLK=b["BLK"], BN1=b["BN1"], BG=b["BG"], **x),
                    dkdv=dict(BLK=b["BLK"], BM2=b["BM2"], **x), far=dict(BG=b["BG"], BM2=b["BM2"], **x),
                    w0=dict(BLK=b["BLK"], NGC_MAX=64, **x), dq_w0=dict(BLK=32, BN1=16, BG=16, **x),
                    w0_tma=dict(BLK=b["BLK"], NGC_MAX=64, LOOP_STAGES=1, **x))
    if dtype == torch.float32:
        x = dict(num_warps=4, num_stages=1)
        return dict(dq=dict(BLK=32, BN1=32, BG=32, **x), dkdv=dict(BLK=32, BM2=32, **x),
                    far=dict(BG=32, BM2=32, **x), w0=None)
    # chosen by tools/bench/bench_dilated_attention.py --sweep on an H100 (2026-11-23). The far
    # kernel reads its query tiles through TMA from T = TMA_FROM_T on: on an H200 (2026-12-02,
    # --sweep-shapes 1x16384,1x65536) 2.5-4% faster fwd+bwd at every pattern; at T = 4096 no faster
    # on an H100 (seventh session), and each host descriptor costs launch time
    return dict(dq=dict(BLK=64, BN1=32, BG=32, num_warps=4, num_stages=3),
                dkdv=dict(BLK=64, BM2=64, num_warps=4, num_stages=2),
                far=dict(BG=64, BM2=64, num_warps=4, num_stages=2, PROGS_PER_SM=8, TMA_FROM_T=8192),
                w0=_W0_CONFIG, w0_tma=_W0_TMA_CONFIG, dq_w0=_DQ_W0_CONFIG)


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
    D, cmin, ns, ng = _pattern_args(T, dilation, initial)
    out = _new_output((T, B, H, Dh), q.dtype, q.device)
    lse = _new_output((B, H, T), torch.float32, q.device)
    cfg = _fwd_config(Dh, q.dtype)
    w0_cfg = cfg.pop("w0", None)
    block_d, even_d = _dims(Dh)
    common = dict(HEAD_DIM=Dh, BLOCK_D=block_d, EVEN_D=even_d, PREC=_prec(q.dtype),
                  UPCAST=_upcast(q.dtype))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])

    def blocks():
        c = dict(cfg)
        # TMA tiles where asked for and possible (else the same kernel with pointer loads)
        kv_rows = c["BM"] if window == 0 else c["BN"]
        tiles = _tile_args(c, [(q, c["BM"]), (k, kv_rows), (v, kv_rows)])
        _LAST_KERNELS["fwd"] = _fwd_kernel[(triton.cdiv(T, c["BM"]), B * H)](
            q, k, v, *tiles, out, lse, *strides,
            T, H, window, initial, D, cmin, ns, scale * _LOG2E, W_ZERO=window == 0, **common, **c,
        )

    ngc = _w0_tile(w0_cfg, window, ng, block_d)
    if not ngc:
        blocks()
        return out, lse

    def single_pass():
        c, tiles, seg = _single_pass_launch(w0_cfg, (q, k, v), T, B * H, q.device)
        _LAST_KERNELS["fwd_w0"] = _fwd_w0_kernel[(triton.cdiv(T, seg), B * H)](
            q, k, v, *tiles, out, *_store_tiles(c, (out,)), lse, *strides,
            T, H, initial, D, cmin, ns, seg, scale * _LOG2E, NGC=ngc, **common, **c,
        )

    # W = 0 with few global keys: the per-block forward (the default without a timer) or the
    # single pass, timed on first use; an explicit configuration with "w0" runs the single pass
    key = (triton.next_power_of_2(T), triton.next_power_of_2(B * H), Dh, dilation, initial, q.dtype,
           str(q.device))
    forced = "single_pass" if _OVERRIDE["fwd"] is not None else None
    W0_FORWARD.run(key, {"blocks": blocks, "single_pass": single_pass}, forced)
    return out, lse


# On the GPU the first W = 0 forward of each shape with few enough global keys times the
# per-block forward against the single pass on the real inputs and keeps the faster; set
# ``W0_FORWARD.mode`` to "blocks" or "single_pass" to force one.
W0_FORWARD = FirstUseChoice("dilated-attention W=0 forward")


def _query_segment(T: int, n_programs_other: int, bm: int, progs_per_sm: int, device) -> int:
    """Query-segment length (a multiple of ``bm``) of the kernels that split the queries into
    segments: enough programs to fill the GPU, as few segments (hence atomics) as possible."""
    if _interpreting():
        return 2 * bm                                        # several segments in tests
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n_seg = max(1, min(triton.cdiv(progs_per_sm * sms, max(n_programs_other, 1)), triton.cdiv(T, bm)))
    return triton.cdiv(triton.cdiv(T, n_seg), bm) * bm


def _w0_tile(cfg: Optional[dict], window: int, ng: int, block_d: int) -> int:
    """Rows of the global-key tile of the single-pass W = 0 backward, or 0 when it does not
    apply (W > 0, disabled, or more global keys than its tile holds)."""
    if cfg is None or window != 0 or block_d > 128:
        return 0
    ngc = max(16, triton.next_power_of_2(max(ng, 1)))
    return ngc if ngc <= cfg["NGC_MAX"] else 0


def _single_pass_launch(cfg: dict, tensors, T: int, n_bh: int, device):
    """Launch kwargs, row-tile arguments and query-segment length of a single-pass W = 0 kernel
    (forward or backward) from its configuration: ``PROGS_PER_SM`` and ``NGC_MAX`` are host-side
    only, ``LOOP_STAGES`` defaults to 1, ``tensors`` are read as ``BLK``-row tiles."""
    c = dict(cfg)
    per_sm = c.pop("PROGS_PER_SM", 2)
    c.pop("NGC_MAX")
    c.setdefault("LOOP_STAGES", 1)
    tiles = _tile_args(c, [(x, c["BLK"]) for x in tensors])
    return c, tiles, _query_segment(T, n_bh, c["BLK"], per_sm, device)


def _row_tile_columns(x: torch.Tensor) -> int:
    """Columns of the 2-D ``[T, columns]`` view (row stride ``x.stride(0)``, unit column stride)
    that covers every (batch, head) row of a ``[T, B, H, Dh]`` tensor: the (b, h) tile is the
    column range ``[b * stride_b + h * stride_h, + Dh)``."""
    _, B, H, Dh = x.shape
    return (B - 1) * x.stride(1) + (H - 1) * x.stride(2) + Dh


def _row_tiles_ok(tensors, blk: int) -> bool:
    """Whether the kernels can read these ``[T, B, H, Dh]`` tensors as TMA 2-D tiles: a
    16-bit dtype, Dh a power of two in [16, 128] (one box row of at most 256 bytes), 16-byte
    aligned base and row / batch / head strides, and rows that do not overlap (the 2-D view must
    be a real matrix)."""
    for x in tensors:
        Dh = x.shape[3]
        if x.dtype not in (torch.bfloat16, torch.float16) or Dh not in (16, 32, 64, 128):
            return False
        if x.stride(3) != 1 or x.data_ptr() % 16 or any(st * 2 % 16 for st in x.stride()[:3]):
            return False
        if x.stride(0) < _row_tile_columns(x) or x.stride(1) < 0 or x.stride(2) < 0:
            return False
    return blk <= 256


def _row_tile_descriptor(x: torch.Tensor, rows: int):
    """Host TMA descriptor of the ``[T, columns]`` view of ``x`` (:func:`_row_tile_columns`),
    one ``[rows, Dh]`` box per load; rows past T read as zeros."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(x, [x.shape[0], _row_tile_columns(x)], [x.stride(0), 1], [rows, x.shape[3]])


def _tile_args(cfg: dict, tiles):
    """Tile arguments of a kernel launch, for ``(tensor, rows)`` pairs. ``cfg["TMA"]``: 0 / False
    (pointer loads), 1 / True (host TMA descriptors of ``rows``-row boxes, encoded by Triton's
    launcher on every launch: 50-100 us of host time each on the H100 host, seventh session) or
    ``"device"`` (descriptors built in the kernel; the tensors are passed). TMA is used only where
    every tensor allows it (:func:`_row_tiles_ok`); ``cfg["TMA"]`` is set to the mode used."""
    tensors = [x for x, _ in tiles]
    mode = cfg.get("TMA", 0)
    mode = 2 if mode == "device" else int(bool(mode))
    cfg["TMA"] = mode if mode and _row_tiles_ok(tensors, max(r for _, r in tiles)) else 0
    if cfg["TMA"] == 2 and not _interpreting():
        _ensure_triton_allocator()
    if cfg["TMA"] != 1:
        return tuple(tensors)
    return tuple(_row_tile_descriptor(x, rows) for x, rows in tiles)


def _store_tiles(cfg: dict, outputs):
    """Output arguments of a single-pass kernel that stores ``cfg["BLK"]``-row tiles: host TMA
    descriptors where ``cfg["TMA_STORE"]`` asks for them and the outputs allow them, else the
    tensors themselves (``cfg["TMA_STORE"]`` is set to the mode used)."""
    if not cfg.get("TMA_STORE"):
        cfg["TMA_STORE"] = False
        return tuple(outputs)
    mode = dict(TMA=True)
    tiles = _tile_args(mode, [(x, cfg["BLK"]) for x in outputs])
    cfg["TMA_STORE"] = bool(mode["TMA"])
    return tiles


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_triton_allocator():
    """In-kernel TMA descriptors live in global scratch that Triton allocates at launch through
    ``triton.set_allocator``; install a PyTorch one (caching allocator, CUDA-graph safe) unless
    the application has set its own."""
    from triton.runtime import _allocation

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def _backward(q, k, v, out, lse, dout, dlse, dilation, window, initial, scale):
    T, B, H, Dh = q.shape
    D, cmin, ns, ng = _pattern_args(T, dilation, initial)
    dev = q.device
    dq = _new_output((T, B, H, Dh), q.dtype, dev)
    dk = _new_output((T, B, H, Dh), k.dtype, dev)
    dv = _new_output((T, B, H, Dh), v.dtype, dev)
    ngb = max(ng, 1)
    cfg = _bwd_config(Dh, q.dtype)
    block_d, even_d = _dims(Dh)
    has_dlse = dlse is not None
    common = dict(HEAD_DIM=Dh, BLOCK_D=block_d, EVEN_D=even_d, PREC=_prec(q.dtype),
                  UPCAST=_upcast(q.dtype))
    s_in = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    scales = (scale * _LOG2E, scale)

    def global_rows(gbuf):
        """The global rows of dk, dv from the fp32 buffers."""
        if ng > 0:
            br = 64
            _bwd_global_kernel[(triton.cdiv(ng, br), B * H)](
                gbuf[0], gbuf[1], dk, dv, *dk.stride()[:3], H, ng, initial, D, cmin, ns,
                HEAD_DIM=Dh, BLOCK_D=block_d, EVEN_D=even_d, BR=br, num_warps=4,
            )

    def split(dq_cfg=None):
        gbuf = torch.zeros((2, B * H, ngb, Dh), dtype=torch.float32, device=dev)
        c = cfg if dq_cfg is None else dict(cfg, dq=dq_cfg)
        _backward_split(q, k, v, out, lse, dout, dlse, dq, dk, dv, gbuf, c, window, initial,
                        D, cmin, ns, ng, common, s_in, scales)
        global_rows(gbuf)

    if window != 0:
        split()
        return dq, dk, dv

    def run_single_pass(w0_cfg):
        # W = 0, few global keys: one pass (dq, diagonal dk/dv, global dk/dv)
        gbuf = torch.zeros((2, B * H, ngb, Dh), dtype=torch.float32, device=dev)
        c0, tiles, seg = _single_pass_launch(w0_cfg, (q, k, v, dout), T, B * H, dev)
        c0.setdefault("FOLD_DIAG", False)
        if c0.get("TMA_STORE") and not c0["FOLD_DIAG"]:
            raise ValueError("single-pass W = 0 backward: TMA_STORE needs FOLD_DIAG (whole row tiles are "
                             "stored; the global rows are rewritten from the compact buffers)")
        out_tiles = _store_tiles(c0, (dq, dk, dv))
        _LAST_KERNELS["bwd_w0"] = _bwd_w0_kernel[(triton.cdiv(T, seg), B * H)](
            q, k, v, dout, *tiles, lse, dlse if has_dlse else lse, dq, dk, dv, *out_tiles, gbuf[0], gbuf[1],
            *s_in, *dout.stride()[:3], *dq.stride()[:3],
            T, H, initial, D, cmin, ns, ngb, seg, *scales,
            NGC=ngc, HAS_DLSE=has_dlse, **common, **c0,
        )
        global_rows(gbuf)

    # W = 0: the split backward first (the default without a timer), then the alternatives
    candidates = {"split": split}
    if cfg.get("dq_w0") is not None:
        def split_dq_w0():
            split(cfg["dq_w0"])
        candidates["split_dq_w0"] = split_dq_w0
    ngc = _w0_tile(cfg.get("w0") or cfg.get("w0_tma"), window, ng, block_d)
    if ngc and cfg.get("w0") is not None:
        def single_pass():
            run_single_pass(cfg["w0"])
        candidates["single_pass"] = single_pass
    if ngc and cfg.get("w0_tma") is not None and _row_tiles_ok((q, k, v, dout), cfg["w0_tma"]["BLK"]):
        def single_pass_tma():
            run_single_pass(dict({"TMA": True}, **cfg["w0_tma"]))
        candidates["single_pass_tma"] = single_pass_tma
    # lengths and batch x heads bucketed to powers of two: varying lengths are timed log-many times
    key = (triton.next_power_of_2(T), triton.next_power_of_2(B * H), Dh, dilation, initial, q.dtype,
           has_dlse, str(dev))
    # an explicit configuration (block_config: tests, sweeps) runs as given: the TMA single pass
    # where given and possible, else the pointer single pass where given, else the split backward
    forced = None
    if _OVERRIDE["bwd"] is not None:
        forced = next(n for n in ("single_pass_tma", "single_pass", "split") if n in candidates)
    W0_BACKWARD.run(key, candidates, forced)
    return dq, dk, dv


# On the GPU the first W = 0 backward of each shape times the candidates (the split backward, the
# split backward with the spill-free dq tiling, the single pass where it applies) on the real
# inputs and keeps the fastest; set ``W0_BACKWARD.mode`` to a candidate's name to force it.
W0_BACKWARD = FirstUseChoice("dilated-attention W=0 backward")


def _backward_split(q, k, v, out, lse, dout, dlse, dq, dk, dv, gbuf, cfg, window, initial,
                    D, cmin, ns, ng, common, s_in, scales):
    """The general backward: query-major dq, key-major band dk/dv, key-major far dk/dv."""
    T, B, H, Dh = q.shape
    ngb = max(ng, 1)
    has_dlse = dlse is not None
    delta = torch.empty((B * H, T), dtype=torch.float32, device=q.device)
    c1, c2, c3 = dict(cfg["dq"]), dict(cfg["dkdv"]), dict(cfg["far"])
    # 1. query-major: delta, dq; with W = 0 also the (diagonal) band dk, dv
    kv_rows = c1["BLK"] if window == 0 else c1["BN1"]
    tiles = _tile_args(c1, [(q, c1["BLK"]), (k, kv_rows), (v, kv_rows), (out, c1["BLK"]),
                            (dout, c1["BLK"])])
    _LAST_KERNELS["bwd_dq"] = _bwd_dq_kernel[(triton.cdiv(T, c1["BLK"]), B * H)](
        q, k, v, out, dout, *tiles, lse, dlse if has_dlse else lse, delta, dq, dk, dv, gbuf[0], gbuf[1],
        *s_in, *out.stride()[:3], *dout.stride()[:3], *dq.stride()[:3],
        T, H, window, initial, D, cmin, ns, ngb, *scales,
        HAS_DLSE=has_dlse, W_ZERO=window == 0, **common, **c1,
    )
    # 2. key-major band dk, dv (W > 0)
    if window > 0:
        tiles = _tile_args(c2, [(q, c2["BM2"]), (dout, c2["BM2"])])
        _LAST_KERNELS["bwd_dkdv"] = _bwd_dkdv_kernel[(triton.cdiv(T, c2["BLK"]), B * H)](
            q, k, v, dout, *tiles, lse, delta, dk, dv, gbuf[0], gbuf[1],
            *s_in, *dout.stride()[:3], *dk.stride()[:3],
            T, H, window, initial, D, cmin, ngb, *scales, **common, **c2,
        )
    # 3. key-major far dk, dv of the global keys (those seen beyond some query's band)
    j0 = 0 if initial > 0 else (cmin + 1) * D - 1             # smallest global key
    if ng > 0 and j0 + window + 1 < T:
        per_sm = c3.pop("PROGS_PER_SM", 8)
        if T >= c3.pop("TMA_FROM_T", T + 1):
            c3["TMA"] = True
        n_tiles = triton.cdiv(ng, c3["BG"])
        seg = _query_segment(T, n_tiles * B * H, c3["BM2"], per_sm, q.device)
        tiles = _tile_args(c3, [(q, c3["BM2"]), (dout, c3["BM2"])])
        _LAST_KERNELS["bwd_far"] = _bwd_far_kernel[(n_tiles, triton.cdiv(T, seg), B * H)](
            q, k, v, dout, *tiles, lse, delta, gbuf[0], gbuf[1],
            *s_in, *dout.stride()[:3],
            T, H, window, initial, D, cmin, ns, ngb, seg, *scales, **common, **c3,
        )


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

