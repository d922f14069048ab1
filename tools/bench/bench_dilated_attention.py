"""Benchmark the fused RAT+ dilated attention against dense SDPA and flex_attention (issue 4).

    PYTHONPATH=kernels:. python tools/bench/bench_dilated_attention.py [--no-flex] [--quick]
        [--sweep] [--no-decode] [--selftest]

Prints the device, then for H x Dh = 16 x 128, bf16, T in {4096, 16384, 65536} at B*T = 65536
tokens (plus the DESIGN.md anchor shape B=4, T=4096) and (D, W, P) in {(64,0,0), (16,256,4),
(16,0,0)}:

* median fwd and fwd+bwd ms (``triton.testing.do_bench``) of
  - dense causal SDPA (``F.scaled_dot_product_attention(is_causal=True)``, [B, H, T, Dh] inputs),
  - the flex_attention two-pass formulation of the same mask (the reference approach): pass 1
    attends the chunk-end keys ``j >= P`` gathered with a stride-D slice of K/V, masked to
    ``t - j > W``; pass 2 attends the local band and the initial keys of the full K/V
    (``j <= t and (t - j <= W or j < P)``); both return their log-sum-exp and the outputs are merged
    by it. The whole two-pass function (gather, two flex calls, merge) is ``torch.compile``d; the
    block masks are built once per shape outside the timed region (which favours flex: the
    reference code rebuilds them on every call),
  - ``fused_dilated_attention`` ([T, B, H, Dh] inputs, Megatron layout);
* TFLOP/s counted on the allowed (query, key) pairs only: 4 Dh flops per pair forward, 14 Dh per
  pair forward+backward (backward = 2.5 x forward), the same count for every method (dense SDPA
  included, so its column says how fast it computes the sparse result);
* speedups of the fused kernel over SDPA and flex, and the DESIGN.md anchor ratios.

Backward timings take gradients with respect to q, k, v (``torch.autograd.grad``).
``--sweep`` first times several launch configurations of the fused kernel at the anchor shape.
A decode table follows: ``decode_attention`` (split-K Triton) vs SDPA on the compact cache
N = 4 + 257 + T/16 entries, B in {1, 4, 16}, H=16, Dh=128, timed with CUDA graphs.
``--selftest`` checks the flex two-pass formulation against the masked-dense reference on CPU
(eager flex, tiny shapes) and exits.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from bench_args import patterns_arg, shapes_arg
from gpu_timing import cuda_kernels, profiled

from megatron_ratplus.attention_pattern import SparsePattern

H, DH = 16, 128
PATTERNS = [(64, 0, 0), (16, 256, 4), (16, 0, 0)]
SHAPES = [(4, 4096), (16, 4096), (4, 16384), (1, 65536)]      # (B, T); first = DESIGN anchor
ANCHORS = {(64, 0, 0): {"flex": 1.415, "target": 0.30}, (16, 256, 4): {"flex": 2.06, "target": 0.45},
           "sdpa": 2.23}


def allowed_pairs(T: int, D: int, W: int, P: int) -> int:
    """Allowed (query, key) pairs of one head (band + initial + chunk-end keys below the band)."""
    return SparsePattern(D, W, P).allowed_pairs(T)


# ------------------------------------------------------------------------------------------------
# flex_attention two-pass formulation
# ------------------------------------------------------------------------------------------------
def _merge(o1, lse1, o2, lse2):
    m = torch.maximum(lse1, lse2)
    w1 = torch.exp(lse1 - m)
    w2 = torch.exp(lse2 - m)
    den = w1 + w2
    return (o1 * (w1 / den).unsqueeze(-1).to(o1.dtype) + o2 * (w2 / den).unsqueeze(-1).to(o2.dtype))


class FlexTwoPass:
    """Sparse RAT+ attention as two flex_attention calls merged by log-sum-exp ([B, H, T, Dh])."""

    def __init__(self, T, D, W, P, device, compile=True):
        import torch._dynamo
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # one compiled graph per (shape, pattern, grad mode): more than dynamo's default 8
        for name, value in (("recompile_limit", 256), ("accumulated_recompile_limit", 4096)):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, value)

        self.T, self.D, self.W, self.P = T, D, W, P
        self.start = (P // D + 1) * D - 1 if D > 0 else T        # first chunk-end key >= P
        self.n_far = len(range(self.start, T, D)) if D > 0 else 0
        start, Dd = self.start, max(D, 1)

        def far_mask(b, h, q_idx, kv_idx):
            return q_idx - (start + kv_idx * Dd) > W

        def near_mask(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & ((q_idx - kv_idx <= W) | (kv_idx < P))

        dev = str(device)
        self.bm_near = create_block_mask(near_mask, None, None, T, T, device=dev)
        self.bm_far = (create_block_mask(far_mask, None, None, T, self.n_far, device=dev)
                       if self.n_far > 0 else None)
        try:                                  # torch >= 2.9 spelling of return_lse
            from torch.nn.attention.flex_attention import AuxRequest

            def fa(q, k, v, block_mask):
                out, aux = flex_attention(q, k, v, block_mask=block_mask,
                                          return_aux=AuxRequest(lse=True))
                return out, aux.lse
        except ImportError:
            def fa(q, k, v, block_mask):
                return flex_attention(q, k, v, block_mask=block_mask, return_lse=True)

        def two_pass(q, k, v, bm_near, bm_far):
            o2, lse2 = fa(q, k, v, bm_near)
            if bm_far is None:
                return o2
            kc = k[:, :, start::Dd]
            vc = v[:, :, start::Dd]
            o1, lse1 = fa(q, kc, vc, bm_far)
            return _merge(o1, lse1, o2, lse2)

        self.fn = torch.compile(two_pass, dynamic=False) if compile else two_pass

    def __call__(self, q, k, v):
        return self.fn(q, k, v, self.bm_near, self.bm_far)


def selftest() -> None:
    from ratplus_kernels.dilated_attention import naive_dilated_attention

    torch.manual_seed(0)
    for T, D, W, P in [(256, 16, 20, 4), (300, 64, 0, 0), (200, 16, 0, 0), (130, 7, 3, 9),
                       (150, -1, 10, 2), (100, 256, 5, 0)]:
        q, k, v = (torch.randn(1, 2, T, 32, dtype=torch.float32) for _ in range(3))
        ref = naive_dilated_attention(*(x.permute(2, 0, 1, 3) for x in (q, k, v)), D, W, P)
        got = FlexTwoPass(T, D, W, P, "cpu", compile=False)(q, k, v).permute(2, 0, 1, 3)
        err = (got - ref).abs().max().item()
        print(f"flex two-pass vs naive T={T} D={D} W={W} P={P}: max abs err {err:.2e}")
        assert err < 1e-4, err
    for T, D, W, P in [(100, 16, 10, 4), (77, 64, 0, 0)]:
        pairs = allowed_pairs(T, D, W, P)
        from ratplus_kernels.dilated_attention import sparse_mask

        assert pairs == int(sparse_mask(T, D, W, P).sum()), (pairs, T, D, W, P)
    print("selftest ok")


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def bench(fn, rep=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def bench_kernels(fn, iters=20):
    """Mean GPU time (ms) of the kernels ``fn`` launches, from the profiler: the sum of kernel
    durations per call, without the host's launch gaps that dominate eager timings of the small
    W = 0 backwards at the anchor shape (CUDA-graph capture of the sweep's autograd calls failed
    on the GPU host in the fourth session)."""
    kernels = cuda_kernels(profiled(fn, iters))
    return sum(e.device_time_total for e in kernels) / iters / 1e3


def time_fwd_bwd(fn, q, k, v, do, rep, graph=False):
    """Median ms of the forward and of forward+backward, eager (``do_bench``: includes the host's
    launch overhead when that exceeds the GPU time); with ``graph`` also forward+backward replayed
    from a CUDA graph (GPU time only; NaN if capture fails)."""
    import triton.testing

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)

    f, fb = bench(fwd, rep), bench(fwd_bwd, rep)
    fbg = float("nan")
    if graph:
        try:
            fbg = triton.testing.do_bench_cudagraph(fwd_bwd, rep=rep, return_mode="median")
        except Exception as e:  # noqa: BLE001
            print(f"  graph capture failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    return f, fb, fbg


def _regs(fm, which) -> str:
    k = fm._LAST_KERNELS.get(which)
    return f"(regs {getattr(k, 'n_regs', '?')}, spills {getattr(k, 'n_spills', '?')})" if k else ""


# Launch configurations timed by --sweep (and compiled offline by tools/bench/kernel_resources.py):
# the forward's, and per backward kernel the variants tried one at a time against the default.
FWD_SWEEP = [dict(BM=64, BN=32, BG=32, num_warps=4, num_stages=3),
             dict(BM=64, BN=64, BG=32, num_warps=4, num_stages=3),
             dict(BM=128, BN=32, BG=32, num_warps=8, num_stages=3),
             dict(BM=64, BN=32, BG=32, num_warps=8, num_stages=3),
             # fifth session: all 64 chunk ends of the anchor in one far tile; smaller query blocks
             dict(BM=64, BN=32, BG=64, num_warps=4, num_stages=3),
             dict(BM=64, BN=64, BG=64, num_warps=8, num_stages=3),
             dict(BM=32, BN=32, BG=64, num_warps=4, num_stages=3),
             dict(BM=128, BN=64, BG=64, num_warps=8, num_stages=2),
             # seventh session: contiguous row tiles through TMA descriptors
             dict(BM=64, BN=32, BG=32, num_warps=4, num_stages=3, TMA=True),
             dict(BM=64, BN=64, BG=32, num_warps=4, num_stages=3, TMA=True),
             dict(BM=128, BN=64, BG=32, num_warps=8, num_stages=3, TMA=True),
             dict(BM=128, BN=32, BG=32, num_warps=8, num_stages=3, TMA=True),
             # twelfth session: larger far tiles for long sequences (T/D global keys per query)
             dict(BM=64, BN=32, BG=64, num_warps=4, num_stages=3, TMA=True),
             dict(BM=64, BN=64, BG=64, num_warps=4, num_stages=3, TMA=True),
             dict(BM=128, BN=64, BG=64, num_warps=8, num_stages=3, TMA=True),
             dict(BM=128, BN=64, BG=128, num_warps=8, num_stages=2, TMA=True)]
# ninth session: the single-pass W = 0 forward (runs where it applies: W = 0, few global keys)
_FWD_DEFAULT = dict(BM=64, BN=32, BG=32, num_warps=4, num_stages=3, TMA=True)
FWD_SWEEP += [dict(_FWD_DEFAULT, w0=dict(BLK=blk, NGC_MAX=64, num_warps=nw, num_stages=1, LOOP_STAGES=st,
                                         PROGS_PER_SM=per_sm, TMA=True))
              for blk, nw, st, per_sm in [(64, 4, 3, 2), (64, 4, 3, 1), (64, 4, 3, 4), (64, 4, 2, 2),
                                          (64, 8, 3, 2), (128, 8, 3, 2), (32, 4, 3, 2), (32, 4, 4, 4),
                                          (64, 4, 4, 2), (64, 4, 3, 8), (64, 4, 3, 6)]]
# tenth session: o stored as TMA tiles
FWD_SWEEP += [dict(_FWD_DEFAULT, w0=dict(BLK=64, NGC_MAX=64, num_warps=4, num_stages=1, LOOP_STAGES=3,
                                         PROGS_PER_SM=per_sm, TMA=True, TMA_STORE=True))
              for per_sm in (2, 4, 8)]
BWD_SWEEP_VARIANTS = {
    "dq": [dict(BLK=128, BN1=64, BG=64, num_warps=8, num_stages=2),
           dict(BLK=64, BN1=64, BG=64, num_warps=8, num_stages=2),
           dict(BLK=128, BN1=32, BG=32, num_warps=8, num_stages=2),
           dict(BLK=32, BN1=32, BG=32, num_warps=4, num_stages=3),        # no spills offline (W=0)
           dict(BLK=64, BN1=32, BG=32, num_warps=8, num_stages=3),
           dict(BLK=64, BN1=32, BG=32, num_warps=4, num_stages=3, TMA=True),   # TMA row tiles
           dict(BLK=32, BN1=32, BG=32, num_warps=4, num_stages=3, TMA=True),
           dict(BLK=64, BN1=64, BG=32, num_warps=8, num_stages=3, TMA=True),
           # twelfth session: larger far tiles for long sequences
           dict(BLK=64, BN1=32, BG=64, num_warps=4, num_stages=3),
           dict(BLK=128, BN1=64, BG=64, num_warps=8, num_stages=3, TMA=True),
           dict(BLK=64, BN1=64, BG=64, num_warps=4, num_stages=3, TMA=True)],
    "dkdv": [dict(BLK=128, BM2=64, num_warps=8, num_stages=2),
             dict(BLK=128, BM2=32, num_warps=8, num_stages=3),
             dict(BLK=64, BM2=32, num_warps=4, num_stages=3),              # no spills offline
             dict(BLK=64, BM2=64, num_warps=8, num_stages=2),
             dict(BLK=64, BM2=64, num_warps=4, num_stages=2, TMA=True),        # TMA row tiles
             dict(BLK=64, BM2=32, num_warps=4, num_stages=3, TMA=True),
             dict(BLK=128, BM2=64, num_warps=8, num_stages=3, TMA=True)],
    "far": [dict(BG=128, BM2=64, num_warps=8, num_stages=2, PROGS_PER_SM=8),
            dict(BG=64, BM2=32, num_warps=4, num_stages=3, PROGS_PER_SM=8),  # no spills offline
            dict(BG=64, BM2=64, num_warps=4, num_stages=2, PROGS_PER_SM=16),
            dict(BG=64, BM2=64, num_warps=4, num_stages=2, PROGS_PER_SM=4),
            dict(BG=32, BM2=64, num_warps=4, num_stages=2, PROGS_PER_SM=8),
            dict(BG=64, BM2=64, num_warps=4, num_stages=2, PROGS_PER_SM=8, TMA=True),   # TMA
            dict(BG=64, BM2=32, num_warps=4, num_stages=3, PROGS_PER_SM=8, TMA=True),
            dict(BG=64, BM2=64, num_warps=4, num_stages=3, PROGS_PER_SM=8, TMA=True),
            # twelfth session: long sequences (more global keys per head)
            dict(BG=128, BM2=64, num_warps=8, num_stages=3, PROGS_PER_SM=8, TMA=True),
            dict(BG=64, BM2=64, num_warps=4, num_stages=3, PROGS_PER_SM=2, TMA=True),
            dict(BG=128, BM2=32, num_warps=8, num_stages=3, PROGS_PER_SM=4)],
    # the single-pass W = 0 backward (replaces dq + far when it applies)
    # (BLK=32 / 8 warps spill-free offline; BLK=64, or BLK=32 at 4 warps, spill 0.3-3 KB per
    # thread; BLK=16 at 4 warps, the default since the tenth session, 16-28 B)
    "w0": [dict(BLK=16, NGC_MAX=64, num_warps=4, num_stages=1, PROGS_PER_SM=8, FOLD_DIAG=True),
           dict(BLK=16, NGC_MAX=64, num_warps=4, num_stages=1, PROGS_PER_SM=8, FOLD_DIAG=True, DQ_T=True),
           dict(BLK=32, NGC_MAX=64, num_warps=8, num_stages=1, PROGS_PER_SM=4),
           dict(BLK=32, NGC_MAX=64, num_warps=8, num_stages=1, PROGS_PER_SM=2),
           dict(BLK=32, NGC_MAX=64, num_warps=8, num_stages=1, PROGS_PER_SM=8),
           dict(BLK=16, NGC_MAX=64, num_warps=8, num_stages=2, PROGS_PER_SM=4),
           dict(BLK=16, NGC_MAX=64, num_warps=8, num_stages=1, PROGS_PER_SM=4),
           dict(BLK=16, NGC_MAX=64, num_warps=8, num_stages=1, PROGS_PER_SM=8),
           dict(BLK=32, NGC_MAX=64, num_warps=8, num_stages=2, PROGS_PER_SM=8),
           dict(BLK=32, NGC_MAX=64, num_warps=8, num_stages=1, PROGS_PER_SM=16),
           # seventh session: the global rows' diagonal folded into the key-major products
           dict(BLK=32, NGC_MAX=64, num_warps=8, num_stages=1, PROGS_PER_SM=8, FOLD_DIAG=True)],
    # the same single pass on pipelined TMA tiles (seventh session; spill-free offline at
    # BLK=32 / 8 warps with 2 or 3 stages, 254-255 registers; BLK=64 or 16 warps spill; the
    # tenth session's default, BLK=16 / 4 warps, spills 2-28 B)
    "w0_tma": [dict(BLK=32, NGC_MAX=64, num_warps=8, num_stages=1, LOOP_STAGES=3, PROGS_PER_SM=8),
               dict(BLK=32, NGC_MAX=64, num_warps=8, num_stages=1, LOOP_STAGES=3, PROGS_PER_SM=8,
                    FOLD_DIAG=True),
               dict(BLK=32, NGC_MAX=64, num_warps=8, num_stages=1, LOOP_STAGES=3, PROGS_PER_SM=4,
                    FOLD_DIAG=True),
               dict(BLK=32, NGC_MAX=64, num_warps=8, num_stages=1, LOOP_STAGES=4, PROGS_PER_SM=8,
                    FOLD_DIAG=True),
               dict(BLK=32, NGC_MAX=64, num_warps=8, num_stages=1, LOOP_STAGES=2, PROGS_PER_SM=8,
                    FOLD_DIAG=True),
               # tenth session: 4 warps (one warpgroup: the score tiles are not computed twice)
               *[dict(BLK=16, NGC_MAX=64, num_warps=4, num_stages=1, LOOP_STAGES=st, PROGS_PER_SM=per_sm,
                      FOLD_DIAG=True) for st in (2, 3, 4) for per_sm in (4, 8, 16)],
               dict(BLK=32, NGC_MAX=64, num_warps=4, num_stages=1, LOOP_STAGES=3, PROGS_PER_SM=8,
                    FOLD_DIAG=True),
               # dq as a transposed (wgmma) product, dq / dk / dv stored as TMA tiles
               *[dict(BLK=16, NGC_MAX=64, num_warps=4, num_stages=1, LOOP_STAGES=st, PROGS_PER_SM=8,
                      FOLD_DIAG=True, **x)
                 for st in (3, 4) for x in (dict(DQ_T=True), dict(TMA_STORE=True),
                                            dict(DQ_T=True, TMA_STORE=True))],
               *[dict(BLK=16, NGC_MAX=64, num_warps=4, num_stages=1, LOOP_STAGES=3, PROGS_PER_SM=per_sm,
                      FOLD_DIAG=True, DQ_T=True, TMA_STORE=True) for per_sm in (6, 10, 12)]],
}
# The sweeps' reference backward: the split one (every single pass switched off).
_NO_SINGLE_PASS = dict(w0=None, w0_tma=None)


def _single_pass_applies(fm, T, pat) -> bool:
    """Whether the single-pass W = 0 backward can run for this pattern at length T."""
    ng = fm._pattern_args(T, pat[0], pat[2])[3]
    return bool(fm._w0_tile(fm._W0_CONFIG or fm._W0_TMA_CONFIG, pat[1], ng, DH))


def run_sweep(args, shape) -> None:
    import ratplus_kernels.dilated_attention.fused as fm
    from ratplus_kernels.dilated_attention import fused_dilated_attention

    B, T = shape
    q, k, v, do = (torch.randn(T, B, H, DH, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)
    fwd_cfgs = [c for c in FWD_SWEEP if args.sweep_kinds is None
                or ("fwd_w0" if "w0" in c else "fwd") in args.sweep_kinds]
    # explicit configurations: the split backward unless a variant sets the single pass
    base = dict(fm._bwd_config(DH, torch.bfloat16), **_NO_SINGLE_PASS)
    variants = {n: cs for n, cs in BWD_SWEEP_VARIANTS.items()
                if args.sweep_kinds is None or n in args.sweep_kinds}
    bwd_cfgs = [base] + [dict(base, **{name: c}) for name, cs in variants.items() for c in cs]
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    print(f"\nsweep at B={B} T={T} (ms of GPU kernel time from the profiler: forward, forward+backward)")
    for pat in PATTERNS:
        for fc in fwd_cfgs:
            if "w0" in fc and not _single_pass_applies(fm, T, pat):
                continue                                  # W > 0 or too many global keys
            fm._LAST_KERNELS.clear()
            with fm.block_config(fwd=fc):
                try:
                    ms = bench_kernels(lambda pat=pat: fused_dilated_attention(qd, kd, vd, *pat))
                except Exception as e:  # noqa: BLE001  (a config may not compile / fit)
                    ms = float("nan")
                    print("  fwd cfg failed:", fc, type(e).__name__, str(e)[-300:])
            print(f"  {pat} fwd {fc}: {ms:.4f} {_regs(fm, 'fwd_w0' if 'w0' in fc else 'fwd')}")
        out = fused_dilated_attention(q, k, v, *pat)
        for bc in bwd_cfgs:
            if pat[1] == 0 and bc["dkdv"] != base["dkdv"]:
                continue                                  # no band kernel when W = 0
            if (bc.get("w0") or bc.get("w0_tma")) and not _single_pass_applies(fm, T, pat):
                continue                                  # W > 0 or too many global keys
            fm._LAST_KERNELS.clear()
            with fm.block_config(bwd=bc):
                try:
                    def run(pat=pat):
                        o = fused_dilated_attention(q, k, v, *pat)
                        torch.autograd.grad(o, (q, k, v), do)
                    ms = bench_kernels(run)
                except Exception as e:  # noqa: BLE001
                    ms = float("nan")
                    print("  bwd cfg failed:", bc, type(e).__name__, str(e)[-300:])
            changed = {n: c for n, c in bc.items() if c != base[n]} or "default"
            regs = " ".join(f"{n}:{_regs(fm, 'bwd_' + n)}" for n in ("dq", "dkdv", "far", "w0")
                            if "bwd_" + n in fm._LAST_KERNELS)
            print(f"  {pat} fwd+bwd {changed}: {ms:.4f} {regs}")
        del out


def run_profile(args, shape) -> None:
    """Per-kernel CUDA time at the sweep shape (default: the anchor): the default configuration,
    and for W = 0 each candidate of the first-use choice, forced."""
    import ratplus_kernels.dilated_attention.fused as fm
    from ratplus_kernels.dilated_attention import fused_dilated_attention

    B, T = shape
    q, k, v, do = (torch.randn(T, B, H, DH, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)
    base = dict(fm._bwd_config(DH, torch.bfloat16), **_NO_SINGLE_PASS)
    for pat in PATTERNS:
        settings = [("default", None)]
        if pat[1] == 0:                # each W = 0 candidate of the first-use choice, forced
            settings = [("split", base), ("split, dq_w0", dict(base, dq=base["dq_w0"]))]
            if _single_pass_applies(fm, T, pat):
                settings.append(("single pass", dict(base, w0=fm._W0_CONFIG)))
                settings.append(("single pass, TMA", dict(base, w0_tma=fm._W0_TMA_CONFIG)))
        for label, bwd in settings:
            with fm.block_config(bwd=bwd):
                events = profiled(lambda pat=pat: torch.autograd.grad(
                    fused_dilated_attention(q, k, v, *pat), (q, k, v), do), 10)
            print(f"\nprofile {pat} {label} B={B} T={T} (per call, us):")
            for e in sorted(events, key=lambda e: -e.device_time_total)[:8]:
                print(f"  {e.key[:60]:60s} {e.device_time_total / 10:9.1f}")


def run_main(args) -> None:
    from ratplus_kernels.dilated_attention import fused_dilated_attention

    shapes = args.shapes or (SHAPES[:2] if args.quick else SHAPES)
    flex_shapes = args.flex_shapes or []
    rows = []
    print("\nms (median). f = forward, fb = forward+backward (eager do_bench), fbG = forward+backward"
          " replayed from a CUDA graph (GPU time). TFLOP/s of the fused kernel over the allowed pairs"
          " only (from fbG). Speedups on fb (eager) / fbG.")
    print(f"{'B':>3} {'T':>6} {'D':>3} {'W':>4} {'P':>2} | {'sdpa f':>7} {'fb':>7} {'fbG':>7} | "
          f"{'flex f':>7} {'fb':>7} | {'ours f':>7} {'fb':>7} {'fbG':>7} | {'TF/s f':>6} {'fbG':>6} | "
          f"{'xsdpa':>5} {'xflex':>5} {'xsdpaG':>6} | {'err':>7}")
    for B, T in shapes:
        rep = 30 if T >= 65536 else 100
        torch.manual_seed(0)
        qb, kb, vb, dob = (torch.randn(B, H, T, DH, device="cuda", dtype=torch.bfloat16)
                           for _ in range(4))
        for x in (qb, kb, vb):
            x.requires_grad_(True)
        # ours: [T, B, H, Dh]
        qt, kt, vt, dot = (x.detach().permute(2, 0, 1, 3).contiguous() for x in (qb, kb, vb, dob))
        for x in (qt, kt, vt):
            x.requires_grad_(True)

        def sdpa(a, b, c):
            return F.scaled_dot_product_attention(a, b, c, is_causal=True)

        sd_f, sd_fb, sd_g = time_fwd_bwd(sdpa, qb, kb, vb, dob, rep, graph=True)
        for D, W, P in PATTERNS:
            pairs = allowed_pairs(T, D, W, P) * B * H
            fl_f = fl_fb = float("nan")
            err = float("nan")

            def ours(a, b, c, D=D, W=W, P=P):
                return fused_dilated_attention(a, b, c, D, W, P)

            if not args.no_flex and (not flex_shapes or (B, T) in flex_shapes):
                try:
                    t0 = time.time()
                    flex = FlexTwoPass(T, D, W, P, "cuda")
                    with torch.no_grad():
                        ref = flex(qb, kb, vb)
                        got = ours(qt, kt, vt).permute(1, 2, 0, 3)
                    err = (got.float() - ref.float()).abs().max().item()
                    fl_f, fl_fb, _ = time_fwd_bwd(flex, qb, kb, vb, dob, rep)
                    print(f"  (flex compiled+timed in {time.time() - t0:.0f}s)", file=sys.stderr)
                    del flex, ref, got
                except Exception as e:  # noqa: BLE001
                    print(f"  flex failed at B={B} T={T} {(D, W, P)}: {type(e).__name__}: "
                          f"{str(e)[:300]}", file=sys.stderr)
                torch.cuda.empty_cache()
            ou_f, ou_fb, ou_g = time_fwd_bwd(ours, qt, kt, vt, dot, rep, graph=True)
            tf_f = 4 * DH * pairs / (ou_f * 1e-3) / 1e12
            tf_g = 14 * DH * pairs / (ou_g * 1e-3) / 1e12
            row = (B, T, D, W, P, sd_f, sd_fb, sd_g, fl_f, fl_fb, ou_f, ou_fb, ou_g, tf_f, tf_g, err)
            rows.append(row)
            print(f"{B:>3} {T:>6} {D:>3} {W:>4} {P:>2} | {sd_f:7.3f} {sd_fb:7.3f} {sd_g:7.3f} | "
                  f"{fl_f:7.3f} {fl_fb:7.3f} | {ou_f:7.3f} {ou_fb:7.3f} {ou_g:7.3f} | "
                  f"{tf_f:6.0f} {tf_g:6.0f} | {sd_fb / ou_fb:5.1f} {fl_fb / ou_fb:5.1f} "
                  f"{sd_g / ou_g:6.1f} | {err:7.1e}")
        del qb, kb, vb, dob, qt, kt, vt, dot
        torch.cuda.empty_cache()
    print("\nanchor shape B=4 T=4096 vs DESIGN.md §4 (fwd+bwd; eager / CUDA graph):")
    for r in rows:
        if (r[0], r[1]) != (4, 4096):
            continue
        pat = (r[2], r[3], r[4])
        a = ANCHORS.get(pat)
        fb, g = r[11], r[12]
        line = f"  {pat}: ours {fb:.3f} / {g:.3f} ms"
        if a:
            line += (f", target {a['target']} ms ({'met' if min(fb, g) <= a['target'] else 'missed'}),"
                     f" reference flex anchor {a['flex']} ms -> {a['flex'] / fb:.1f}x / "
                     f"{a['flex'] / g:.1f}x")
        line += f", dense SDPA anchor {ANCHORS['sdpa']} ms -> {ANCHORS['sdpa'] / fb:.1f}x / " \
                f"{ANCHORS['sdpa'] / g:.1f}x"
        print(line)
    import ratplus_kernels.dilated_attention.fused as fm
    for what, choice in (("forward", fm.W0_FORWARD), ("backward", fm.W0_BACKWARD)):
        if choice.timings:
            print(f"\nW = 0 {what} chosen at first use (mode '{choice.mode}'; GPU ms per candidate):")
            for key, times in choice.timings.items():
                T, BH, _, D, P = key[:5]
                print(f"  T<={T} B*H<={BH} D={D} P={P}: "
                      + ", ".join(f"{n} {t:.3f}" for n, t in times.items()) + f" -> {choice.choices[key]}")


def run_decode_sweep(args) -> None:
    import triton.testing
    from ratplus_kernels.dilated_attention.decode import sdpa_decode_attention, triton_decode_attention

    print("\ndecode sweep (us, CUDA-graph replay)")
    for B, T in ((1, 65536), (16, 65536), (4, 16384)):
        N = 4 + 257 + T // 16
        q = torch.randn(B, H, DH, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(B, H, N, DH, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(B, H, N, DH, device="cuda", dtype=torch.bfloat16)
        t_s = triton.testing.do_bench_cudagraph(lambda q=q, kc=kc, vc=vc: sdpa_decode_attention(q, kc, vc),
                                                rep=30, return_mode="median") * 1e3
        res = []
        for bn in (32, 64):
            for nw in (4, 8):
                for per_sm in (2, 4, 8):
                    def f(q=q, kc=kc, vc=vc, bn=bn, nw=nw, per_sm=per_sm):
                        return triton_decode_attention(q, kc, vc, block_n=bn, num_warps=nw,
                                                       splits_per_sm=per_sm)
                    try:
                        t = triton.testing.do_bench_cudagraph(f, rep=30, return_mode="median") * 1e3
                    except Exception:  # noqa: BLE001
                        t = float("nan")
                    res.append((t, bn, nw, per_sm))
        res.sort()
        print(f"  B={B} T={T} N={N}: sdpa {t_s:.1f}; best triton " +
              ", ".join(f"{t:.1f} (BN={bn} warps={nw} splits/SM={ps})" for t, bn, nw, ps in res[:3]))


def run_decode(args) -> None:
    import triton.testing
    from ratplus_kernels.dilated_attention.decode import sdpa_decode_attention, triton_decode_attention

    print("\ndecode: one query over the compact cache N = 4 + 257 + T/16, H=16, Dh=128, bf16 "
          "(decode_attention = sdpa); "
          "us (median, CUDA-graph replay); err = max abs vs SDPA")
    print(f"{'B':>3} {'T':>6} {'N':>5} | {'sdpa':>8} {'triton':>8} {'x':>5} | {'GB/s tri':>8} | {'err':>8}")
    for B in (1, 4, 16):
        for T in (4096, 16384, 65536):
            N = 4 + 257 + T // 16
            q = torch.randn(B, H, DH, device="cuda", dtype=torch.bfloat16)
            # caches as views of a larger preallocated buffer (capacity N + 64)
            kbuf = torch.randn(B, H, N + 64, DH, device="cuda", dtype=torch.bfloat16)
            vbuf = torch.randn(B, H, N + 64, DH, device="cuda", dtype=torch.bfloat16)
            kc, vc = kbuf[:, :, :N], vbuf[:, :, :N]
            a = sdpa_decode_attention(q, kc, vc)
            b = triton_decode_attention(q, kc, vc)
            err = (a.float() - b.float()).abs().max().item()
            def f_sdpa(q=q, kc=kc, vc=vc):
                return sdpa_decode_attention(q, kc, vc)

            def f_triton(q=q, kc=kc, vc=vc):
                return triton_decode_attention(q, kc, vc)

            t_s = triton.testing.do_bench_cudagraph(f_sdpa, rep=50, return_mode="median") * 1e3
            t_t = triton.testing.do_bench_cudagraph(f_triton, rep=50, return_mode="median") * 1e3
            gbs = 2 * B * H * N * DH * 2 / (t_t * 1e-6) / 1e9
            print(f"{B:>3} {T:>6} {N:>5} | {t_s:8.1f} {t_t:8.1f} {t_s / t_t:5.2f} | {gbs:8.0f} | {err:8.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--quick", action="store_true", help="T=4096 shapes only")
    ap.add_argument("--sweep", action="store_true", help="time launch configurations first")
    ap.add_argument("--shapes", type=shapes_arg, default=None,
                    help="comma-separated BxT list, e.g. 4x4096,1x65536")
    ap.add_argument("--flex-shapes", type=shapes_arg, default=None,
                    help="BxT list to run flex on (default: all)")
    ap.add_argument("--sweep-shapes", type=shapes_arg, default=[(4, 4096)],
                    help="BxT list of --sweep and --profile (default 4x4096, the anchor)")
    ap.add_argument("--sweep-kinds", default=None, type=lambda x: x.split(","),
                    help="--sweep only these: fwd, fwd_w0 (single-pass W = 0 forward) and/or backward kernels among "
                         + ",".join(BWD_SWEEP_VARIANTS) + " (default: all)")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--decode-sweep", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-kernel times at the anchor shape")
    ap.add_argument("--no-main", action="store_true")
    ap.add_argument("--selftest", action="store_true", help="CPU check of the flex formulation")
    ap.add_argument("--patterns", type=patterns_arg, default=None,
                    help="D/W/P list for the sweep, profile and table, e.g. 64/0/0,16/256/4 (default: all)")
    args = ap.parse_args()
    if args.patterns:
        global PATTERNS
        PATTERNS = args.patterns
    unknown = set(args.sweep_kinds or []) - {"fwd", "fwd_w0", *BWD_SWEEP_VARIANTS}
    if unknown:
        ap.error(f"--sweep-kinds: unknown {sorted(unknown)}; choose from fwd,fwd_w0," + ",".join(BWD_SWEEP_VARIANTS))
    if args.selftest:
        selftest()
        return
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (use --selftest on CPU)")
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}; H={H}, Dh={DH}, bf16")
    for shape in args.sweep_shapes:
        if args.sweep:
            run_sweep(args, shape)
        if args.profile:
            run_profile(args, shape)
    if args.decode_sweep:
        run_decode_sweep(args)
    if not args.no_main:
        run_main(args)
    if not args.no_decode:
        run_decode(args)


if __name__ == "__main__":
    main()
