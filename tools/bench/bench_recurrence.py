"""Benchmark the fused RAT+ recurrence against the reference formulations (issue 3).

    PYTHONPATH=kernels:. python tools/bench/bench_recurrence.py [--no-ref] [--no-fla] [--quick] [--shapes BxT,...]

Prints the device, the measured device-to-device copy bandwidth, then for H x D = 16 x 128, bf16,
and T in {1024, 4096, 16384, 65536} at B*T = 65536 tokens (plus the DESIGN.md anchor B=4, T=4096):

* median ms of the fused kernel forward and forward+backward (GPU time, tools/bench/gpu_timing.py:
  L2 flushed and the host's launch time hidden before every call; an eager do_bench column too),
  with the achieved GB/s over the bytes the op must move
  (forward: read g, k, v, write k~, v~ = 5 tensors; backward: read g, k, v, dk~, dv~, write dg, dk,
  dv = 8 tensors) and that as a fraction of the measured copy bandwidth;
* (a) the torch associative_scan formulation of the reference RAT+ code: fp32 gate sigmoid,
  the gate repeated for the k and v halves, ``(1 - a) * cat(k, v)`` in a [B, H, T, 2D] layout,
  ``torch._higher_order_ops.associative_scan`` (combine_mode="generic") in a torch.compile'd
  autograd Function whose backward is the reverse scan, outputs cast back to bf16. Timed end to end
  from the same bf16 [T, B, H, D] inputs to bf16 outputs;
* (b) flash-linear-attention ``chunk_hgrn`` (bf16, [B, T, 2 H D], log-gate) when importable; only
  the chunk_hgrn call is timed (its input preparation is excluded, which favours fla).

Backward timings take gradients with respect to g, k, v themselves (torch.autograd.grad), so the
views' scatter into a fused projection gradient is not counted for any of the methods.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import ratplus_kernels.recurrence.fused as fused_mod
import torch
import torch.nn.functional as F
import triton
import triton.testing
from bench_args import shapes_arg
from gpu_timing import gpu_median, gpu_times, histogram, percentile
from ratplus_kernels.recurrence import fused_gated_recurrence

H, D = 16, 128
SHAPES = [(64, 1024), (16, 4096), (4, 16384), (1, 65536), (4, 4096)]  # (B, T); last = anchor
ANCHOR = {"ref_ms": 2.35, "fla_ms": 2.0, "target_ms": 0.25}  # DESIGN.md §4, fwd+bwd, B=4 T=4096


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    n = 1 << 28  # 256 Mi floats = 1 GiB
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# (a) the reference formulation: compiled torch associative_scan in fp32
# ------------------------------------------------------------------------------------------------
def _affine(left, right):
    a_l, x_l = left
    a_r, x_r = right
    return a_r * a_l, a_r * x_l + x_r


def _scan_fwd(a, x):
    from torch._higher_order_ops.associative_scan import associative_scan

    return associative_scan(_affine, (a, x), dim=2, combine_mode="generic")[1]


def _scan_bwd(a, h, dh):
    from torch._higher_order_ops.associative_scan import associative_scan

    a_next = F.pad(a[:, :, 1:], (0, 0, 0, 1))                 # a_{t+1}, 0 past the end
    dx = associative_scan(_affine, (a_next, dh), dim=2, reverse=True, combine_mode="generic")[1]
    da = torch.zeros_like(h)
    da[:, :, 1:] = h[:, :, :-1] * dx[:, :, 1:]
    return da, dx


_scan_fwd_c = torch.compile(_scan_fwd, dynamic=False, fullgraph=True)
_scan_bwd_c = torch.compile(_scan_bwd, dynamic=False, fullgraph=True)


class _RefScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x):
        h = _scan_fwd_c(a, x)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h = ctx.saved_tensors
        return _scan_bwd_c(a, h, dh.contiguous())


def reference_recurrence(g, k, v):
    """[T, B, H, D] bf16 in, [B, H, T, D] bf16 out (the reference code's attention layout)."""
    a = torch.sigmoid(g.float()).permute(1, 2, 0, 3)              # [B, H, T, D]
    a2 = a.repeat(1, 1, 1, 2)
    kv = torch.cat([k, v], dim=-1).permute(1, 2, 0, 3).float()
    h = _RefScan.apply(a2, (1.0 - a2) * kv)
    d = g.shape[-1]
    return h[..., :d].to(k.dtype), h[..., d:].to(v.dtype)


# ------------------------------------------------------------------------------------------------
def make_inputs(B, T, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(T, B, H, 5, D, device="cuda", dtype=dtype)
    x[:, :, :, 4] += 3.0                                      # gates around a = 0.95
    x.requires_grad_(True)
    g, k, v = x[:, :, :, 4], x[:, :, :, 2], x[:, :, :, 3]   # strided views, as in the layer
    return x, g, k, v


def _f_and_b(fwd, inputs, grads):
    def f_and_b():
        outs = fwd(*inputs)
        torch.autograd.grad(outs, inputs, grads)
    return f_and_b


def timed_pair(fwd, inputs, grads):
    """(forward ms, forward+backward ms) of ``fwd(*inputs) -> outputs``: median GPU time
    (gpu_timing: the host's launch time hidden, L2 flushed before each call)."""
    def f_only():
        with torch.no_grad():
            fwd(*inputs)

    return gpu_median(f_only), gpu_median(_f_and_b(fwd, inputs, grads))


def eager_fwd_bwd(fwd, inputs, grads):
    """Forward+backward median ms with do_bench, as a training step sees it when the host's
    launches are not hidden behind other GPU work (includes host time where that is longer)."""
    return bench(_f_and_b(fwd, inputs, grads))


# (BT, BD, VEC, num_warps): BD = 32 VEC num_warps keeps every time row inside one thread (warps
# along channels); BD = 32 VEC puts the warps along time.
FWD_SWEEP = [(32, 64, 2, 4), (64, 64, 2, 4), (64, 32, 8, 4), (16, 64, 2, 2), (32, 64, 2, 2),
             (32, 32, 8, 4), (32, 128, 4, 4), (16, 128, 4, 4), (64, 128, 4, 8), (32, 64, 4, 2),
             (16, 64, 2, 4)]
# BD = 32 VEC num_warps (fifth session): the warps run along channels too, so every time row of
# a channel is in one thread and the scans need no shared memory or shuffles (spilling
# combinations, e.g. 64x128/2 w2, left out after offline compilation)
FWD_SWEEP += [(16, 128, 2, 2), (32, 128, 2, 2), (16, 128, 1, 4), (32, 128, 1, 4), (16, 64, 1, 2),
              (32, 64, 1, 2), (16, 128, 4, 1), (16, 32, 1, 1)]
BWD_SWEEP = [(bt, bd, vec, nw, early) for early in (1, 0) for bt, bd, vec, nw in
             ((16, 64, 2, 4), (16, 64, 2, 2), (32, 32, 4, 4), (32, 64, 2, 4), (32, 32, 8, 4),
              (16, 32, 4, 4), (16, 64, 4, 4), (32, 32, 2, 2))]
BWD_SWEEP += [(bt, bd, vec, nw, early) for early in (0, 2) for bt, bd, vec, nw in
              ((16, 64, 1, 2), (16, 128, 1, 4), (16, 32, 1, 1), (16, 64, 2, 1))]


def _as_meta(cfg):
    """Launch kwargs of a sweep tuple (BT, BD, VEC, num_warps[, EARLY[, maxnreg]]): the tuple is
    the argument list of the kernel module's own candidate constructor."""
    return fused_mod._launch_kwargs(fused_mod._cfg(*cfg))


def config_label(meta) -> str:
    """Short name of a launch configuration, e.g. ``16x64/2 w4 early=2 maxnreg=96`` (look-back)
    or ``stream 16x32/8 w1 stages=4``."""
    text = "stream " if fused_mod.is_streaming(meta) else ""
    text += "%dx%d/%d w%d" % (meta["BT"], meta["BD"], meta["VEC"], meta["num_warps"])
    text += f" early={meta['EARLY']}" if "EARLY" in meta else ""
    text += f" stages={meta['STAGES']}" if "STAGES" in meta else ""
    return text + (f" maxnreg={meta['maxnreg']}" if meta.get("maxnreg") else "")


def _regs(kind):
    k = fused_mod._LAST_COMPILED.get(kind)
    return f"{getattr(k, 'n_regs', '?')}r/{getattr(k, 'n_spills', '?')}s" if k is not None else "?"


def sweep_metas(designs):
    """Forward and backward launch kwargs the sweep times, for a set of designs ("lookback":
    FWD_SWEEP / BWD_SWEEP, "candidates": every autotuning candidate of both designs)."""
    fwd, bwd = [], []
    if "lookback" in designs:
        fwd += [_as_meta(c) for c in FWD_SWEEP]
        bwd += [_as_meta(c) for c in BWD_SWEEP]
    if "candidates" in designs:
        fwd += [fused_mod._launch_kwargs(c) for c in fused_mod.forward_candidates()]
        bwd += [fused_mod._launch_kwargs(c) for c in fused_mod.backward_candidates()]
    dedup = []
    for m in fwd, bwd:
        dedup.append([x for i, x in enumerate(m) if x not in m[:i]])
    return dedup


def sweep(designs=("lookback",), shapes=((4, 4096), (1, 65536))):
    """Forward and backward GPU time (and registers / spills) of each launch configuration, forced."""
    fwd_metas, bwd_metas = sweep_metas(designs)
    print("config sweep (ms; BTxBD/VEC wWARPS regs/spills; lookback depth %d)"
          % fused_mod._lookback_depth())
    for B, T in shapes:
        x, g, k, v = make_inputs(B, T)
        dko = torch.randn(T, B, H, D, device="cuda", dtype=x.dtype)
        dvo = torch.randn_like(dko)

        def fused(g, k, v):
            ko, vo, _ = fused_gated_recurrence(g, k, v)
            return ko, vo

        results = []
        for meta in fwd_metas:
            fused_mod._FORCE_CONFIG["fwd"] = meta
            with torch.no_grad():
                fused(g, k, v)
            ms = gpu_median(lambda: fused(g, k, v), calls=50)
            results.append((ms, config_label(meta), _regs("fwd")))
        for ms, label, regs in sorted(results):
            print(f"  fwd B={B} T={T}: {label} {regs} = {ms:.3f} ms", flush=True)
        fused_mod._FORCE_CONFIG["fwd"] = _as_meta((16, 64, 2, 4))   # BT=16: any backward BT fits
        f_ms = gpu_median(lambda: fused(g, k, v), calls=50)
        results = []
        for meta in bwd_metas:
            fused_mod._FORCE_CONFIG["bwd"] = meta
            torch.autograd.grad(fused(g, k, v), (g, k, v), (dko, dvo))
            ms = gpu_median(lambda: torch.autograd.grad(fused(g, k, v), (g, k, v), (dko, dvo)), calls=50)
            results.append((ms - f_ms, config_label(meta), _regs("bwd")))
        for ms, label, regs in sorted(results):
            print(f"  bwd B={B} T={T}: {label} {regs} = {ms:.3f} ms", flush=True)
        fused_mod._FORCE_CONFIG.update(fwd=None, bwd=None)
    torch.cuda.empty_cache()


def spread(calls=300):
    """Per-call GPU time of the anchor's backward (gpu_timing: L2 flushed, the host's launch time
    hidden), greedy and deterministic look-back: percentiles and a histogram, to tell a per-launch
    bimodality (some launches slow) from a per-process state (every launch of a run slow)."""
    x, g, k, v = make_inputs(4, 4096)
    dko = torch.randn(4096, 4, H, D, device="cuda", dtype=x.dtype)
    dvo = torch.randn_like(dko)
    saved = fused_mod._LOOKBACK_DEPTH
    print(f"backward spread at the anchor B=4 T=4096 ({calls} calls, ms per call)")
    try:
        for depth in (0, fused_mod._DETERMINISTIC_DEPTH):
            fused_mod._LOOKBACK_DEPTH = depth
            ko, vo, _ = fused_gated_recurrence(g, k, v)

            def backward():
                torch.autograd.grad((ko, vo), (g, k, v), (dko, dvo), retain_graph=True)

            ts = gpu_times(backward, calls)
            print(f"  depth {depth}: " + "  ".join(f"p{p} {percentile(ts, p):.3f}" for p in (0, 10, 50, 90, 99))
                  + f"  max {ts[-1]:.3f}")
            for line in histogram(ts):
                print("    " + line)
    finally:
        fused_mod._LOOKBACK_DEPTH = saved


# forced (forward, backward) block pairs timed by --compare next to the autotuned kernels
AB_PAIRS = [((16, 64, 2, 2), (16, 64, 2, 4, 0, 96)), ((16, 64, 2, 2), (16, 64, 2, 4, 2, 96)),
            ((16, 64, 2, 2), (16, 64, 2, 1, 2)), ((16, 128, 4, 1), (16, 64, 2, 4, 2, 96)),
            ((16, 128, 4, 1), (16, 64, 2, 1, 2))]


def _load_other(path, index):
    """Another version of fused.py as a module of the kernel package (its relative imports)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"ratplus_kernels.recurrence._other_fused{index}", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "ratplus_kernels.recurrence"
    spec.loader.exec_module(mod)
    return mod


def compare_previous(paths, rounds=5, pairs=True):
    """A/B at the anchor against other versions of fused.py (e.g. the previous commit's, or a
    diagnostic variant), all autotuned, plus forced block pairs of the current one; interleaved
    rounds expose run-to-run noise (the greedy look-back's timing depends on which tiles run
    together)."""
    x, g, k, v = make_inputs(4, 4096)
    dko = torch.randn(4096, 4, H, D, device="cuda", dtype=x.dtype)
    dvo = torch.randn_like(dko)
    variants = [(f"{os.path.basename(p)} (autotuned)", _load_other(p, i).fused_gated_recurrence, None)
                for i, p in enumerate(paths)]
    variants.append(("current (autotuned)", fused_gated_recurrence, None))
    variants += [(f"current {config_label(_as_meta(f))} + {config_label(_as_meta(b))}",
                  fused_gated_recurrence, (f, b)) for f, b in (AB_PAIRS if pairs else [])]
    times = {name: [] for name, _, _ in variants}
    for _ in range(rounds):
        for name, fn, pair in variants:
            fused_mod._FORCE_CONFIG.update(fwd=_as_meta(pair[0]) if pair else None,
                                           bwd=_as_meta(pair[1]) if pair else None)

            def run(g, k, v, fn=fn):
                ko, vo, _ = fn(g, k, v)
                return ko, vo
            times[name].append(timed_pair(run, (g, k, v), (dko, dvo)))
    fused_mod._FORCE_CONFIG.update(fwd=None, bwd=None)
    for name, ts in times.items():
        print(f"  A/B anchor {name:42s}: fwd " + " ".join(f"{f:.3f}" for f, _ in ts)
              + "  fwd+bwd " + " ".join(f"{fb:.3f}" for _, fb in ts) + " ms", flush=True)
    for key, cfg in fused_mod._TUNED.items():
        print(f"  tuned {key[0]} {key[1:4]}: {config_label(cfg)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-ref", action="store_true", help="skip the torch associative_scan reference")
    ap.add_argument("--ref-anchor-only", action="store_true",
                    help="run the (slow to compile) reference at the anchor shape only")
    ap.add_argument("--spread", action="store_true",
                    help="first print the per-call spread of the anchor's backward time")
    ap.add_argument("--depths", action="store_true",
                    help="also time the anchor with the deterministic look-back (depth 8)")
    ap.add_argument("--no-fla", action="store_true", help="skip fla chunk_hgrn")
    ap.add_argument("--quick", action="store_true", help="anchor shape only")
    ap.add_argument("--shapes", type=shapes_arg, default=None, metavar="BxT,...",
                    help="benchmark these (B, T) instead, e.g. 8x4096,2x4096 (16x128 heads)")
    ap.add_argument("--sweep", action="store_true",
                    help="first time every forward / backward block config (anchor and T=65536)")
    ap.add_argument("--sweep-designs", default="lookback",
                    help="comma-separated sets the sweep times: lookback (FWD_SWEEP / BWD_SWEEP), "
                         "candidates (every autotuning candidate of both designs)")
    ap.add_argument("--sweep-shapes", type=shapes_arg, default=None, metavar="BxT,...",
                    help="shapes of the sweep (default 4x4096,1x65536)")
    ap.add_argument("--compare", metavar="FUSED_PY", action="append",
                    help="first A/B the anchor against another version of recurrence/fused.py "
                         "(repeatable)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --compare")
    ap.add_argument("--no-pairs", action="store_true",
                    help="--compare without the forced block pairs (AB_PAIRS) of the current kernels")
    ap.add_argument("--sweep-only", action="store_true", help="stop after --sweep / --compare / --spread")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    torch._dynamo.config.cache_size_limit = 64
    chunk_hgrn = None
    if not args.no_fla:
        try:
            from fla.ops.hgrn import chunk_hgrn
        except Exception as e:  # noqa: BLE001
            print(f"fla chunk_hgrn not importable ({type(e).__name__}: {e}); column skipped")

    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"device: {dev}   torch {torch.__version__}   triton {triton.__version__}")
    print(f"measured device copy bandwidth: {bw:.0f} GB/s (read + write)")
    if args.compare:
        compare_previous(args.compare, rounds=args.rounds, pairs=not args.no_pairs)
    if args.sweep:
        designs = tuple(x.strip() for x in args.sweep_designs.split(","))
        unknown = set(designs) - {"lookback", "candidates"}
        if unknown:
            ap.error(f"--sweep-designs: unknown design(s) {sorted(unknown)}")
        sweep(designs, args.sweep_shapes or ((4, 4096), (1, 65536)))
    if args.spread:
        spread()
    if args.sweep_only:
        return 0
    shapes = args.shapes or ([(4, 4096)] if args.quick else SHAPES)
    rows = []
    for B, T in shapes:
        t0 = time.time()
        x, g, k, v = make_inputs(B, T)
        n = T * B * H * D
        esz = x.element_size()
        bytes_f, bytes_fb = 5 * n * esz, 13 * n * esz
        dko = torch.randn(T, B, H, D, device="cuda", dtype=x.dtype)
        dvo = torch.randn_like(dko)

        def fused(g, k, v):
            ko, vo, _ = fused_gated_recurrence(g, k, v)
            return ko, vo

        fused(g, k, v)  # autotune outside the timings
        torch.autograd.grad(fused(g, k, v), (g, k, v), (dko, dvo))
        f_ms, fb_ms = timed_pair(fused, (g, k, v), (dko, dvo))
        row = {"B": B, "T": T, "f": f_ms, "fb": fb_ms, "fb_eager": eager_fwd_bwd(fused, (g, k, v), (dko, dvo)),
               "gbs_f": bytes_f / f_ms / 1e6, "gbs_fb": bytes_fb / fb_ms / 1e6,
               "floor_fb": bytes_fb / (bw * 1e9) * 1e3}
        tkey, bhkey = triton.next_power_of_2(T), triton.next_power_of_2(B * H)
        row["cfg"] = ", ".join(f"{key[0]} {config_label(c)}" for key, c in fused_mod._TUNED.items()
                               if key[1:4] == (D, tkey, bhkey))

        if not args.no_ref and (not args.ref_anchor_only or (B, T) == (4, 4096)):
            try:
                dk_ref = dko.permute(1, 2, 0, 3).contiguous()
                dv_ref = dvo.permute(1, 2, 0, 3).contiguous()
                ko_r, vo_r = reference_recurrence(g, k, v)
                ko_f, vo_f, _ = fused_gated_recurrence(g, k, v)
                err = max(((ko_r.float() - ko_f.permute(1, 2, 0, 3).float()).norm()
                           / ko_r.float().norm()).item(),
                          ((vo_r.float() - vo_f.permute(1, 2, 0, 3).float()).norm()
                           / vo_r.float().norm()).item())
                row["ref_err"] = err
                rf, rfb = timed_pair(reference_recurrence, (g, k, v), (dk_ref, dv_ref))
                row.update(ref_f=rf, ref_fb=rfb)
                # the compiled scan alone, on prepared fp32 [B, H, T, 2D] inputs
                with torch.no_grad():
                    a2 = torch.sigmoid(g.float()).permute(1, 2, 0, 3).repeat(1, 1, 1, 2).contiguous()
                    xs = ((1 - a2) * torch.cat([k, v], -1).permute(1, 2, 0, 3).float()).contiguous()
                a2.requires_grad_(True)
                xs.requires_grad_(True)
                dh = torch.randn_like(xs)
                sf, sfb = timed_pair(_RefScan.apply, (a2, xs), (dh,))
                row.update(scan_f=sf, scan_fb=sfb)
                del a2, xs, dh
            except Exception as e:  # noqa: BLE001
                print(f"  reference failed at B={B} T={T}: {type(e).__name__}: {e}")
        if chunk_hgrn is not None:
            try:
                with torch.no_grad():
                    a = torch.sigmoid(g.float())
                    xh = ((1 - a).repeat(1, 1, 1, 2) * torch.cat([k, v], -1).float())
                    xh = xh.permute(1, 0, 2, 3).reshape(B, T, 2 * H * D).to(x.dtype).contiguous()
                    gl = F.logsigmoid(g.float()).repeat(1, 1, 1, 2).permute(1, 0, 2, 3)
                    gl = gl.reshape(B, T, 2 * H * D).to(x.dtype).contiguous()
                xh.requires_grad_(True)
                gl.requires_grad_(True)
                do = torch.randn_like(xh)

                def fla(xh, gl):
                    return chunk_hgrn(xh, gl)[0]

                torch.autograd.grad(fla(xh, gl), (xh, gl), do)
                ff, ffb = timed_pair(fla, (xh, gl), (do,))
                row.update(fla_f=ff, fla_fb=ffb)
            except Exception as e:  # noqa: BLE001
                print(f"  fla failed at B={B} T={T}: {type(e).__name__}: {e}")
        rows.append(row)
        print(f"  B={B} T={T}: fused fwd {f_ms:.3f} ms, fwd+bwd {fb_ms:.3f} ms"
              f" [{row['cfg']}] ({time.time() - t0:.0f}s)", flush=True)
        del x, g, k, v, dko, dvo
        torch.cuda.empty_cache()

    def fmt(v, spec=".3f"):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    print()
    print(f"H={H} D={D} bf16, {dev}, copy {bw:.0f} GB/s; GB/s over 5 (fwd) / 13 (fwd+bwd) tensor passes")
    hdr = ("| B | T | fused fwd ms | fwd GB/s (% copy) | fused fwd+bwd ms | fwd+bwd GB/s (% copy) | "
           "HBM floor fwd+bwd ms | eager fwd+bwd ms | ref assoc_scan fwd / fwd+bwd ms | speedup fwd / fwd+bwd | "
           "ref scan only fwd / fwd+bwd ms | speedup | "
           "fla chunk_hgrn fwd / fwd+bwd ms | speedup fwd / fwd+bwd |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        ref = (f"{fmt(r.get('ref_f'))} / {fmt(r.get('ref_fb'))}",
               f"{fmt(r['ref_f'] / r['f'], '.1f')}x / {fmt(r['ref_fb'] / r['fb'], '.1f')}x"
               if "ref_f" in r else "—")
        sc = (f"{fmt(r.get('scan_f'))} / {fmt(r.get('scan_fb'))}",
              f"{fmt(r['scan_f'] / r['f'], '.1f')}x / {fmt(r['scan_fb'] / r['fb'], '.1f')}x"
              if "scan_f" in r else "—")
        fl = (f"{fmt(r.get('fla_f'))} / {fmt(r.get('fla_fb'))}",
              f"{fmt(r['fla_f'] / r['f'], '.1f')}x / {fmt(r['fla_fb'] / r['fb'], '.1f')}x"
              if "fla_f" in r else "—")
        print(f"| {r['B']} | {r['T']} | {r['f']:.3f} | {r['gbs_f']:.0f} ({100 * r['gbs_f'] / bw:.0f}%) | "
              f"{r['fb']:.3f} | {r['gbs_fb']:.0f} ({100 * r['gbs_fb'] / bw:.0f}%) | {r['floor_fb']:.3f} | "
              f"{r['fb_eager']:.3f} | "
              f"{ref[0]} | {ref[1]} | {sc[0]} | {sc[1]} | {fl[0]} | {fl[1]} |")
    anchor = [r for r in rows if (r["B"], r["T"]) == (4, 4096)]
    if anchor:
        r = anchor[-1]
        print(f"\nanchor B=4 T=4096 fwd+bwd: fused {r['fb']:.3f} ms; target {ANCHOR['target_ms']} ms; "
              f"vs DESIGN.md anchors: reference {ANCHOR['ref_ms']} ms -> {ANCHOR['ref_ms'] / r['fb']:.1f}x, "
              f"fla {ANCHOR['fla_ms']} ms -> {ANCHOR['fla_ms'] / r['fb']:.1f}x")
    if args.depths:
        x, g, k, v = make_inputs(4, 4096)
        dko = torch.randn(4096, 4, H, D, device="cuda", dtype=x.dtype)
        dvo = torch.randn_like(dko)

        def fused2(g, k, v):
            ko, vo, _ = fused_gated_recurrence(g, k, v)
            return ko, vo

        default = fused_mod._lookback_depth()
        saved = fused_mod._LOOKBACK_DEPTH
        for depth in (8,):
            fused_mod._LOOKBACK_DEPTH = depth
            torch.autograd.grad(fused2(g, k, v), (g, k, v), (dko, dvo))
            f_ms, fb_ms = timed_pair(fused2, (g, k, v), (dko, dvo))
            print(f"anchor, look-back depth {depth}{' (default)' if depth == default else ''}: "
                  f"fwd {f_ms:.3f} ms, fwd+bwd {fb_ms:.3f} ms")
        fused_mod._LOOKBACK_DEPTH = saved
    errs = [r["ref_err"] for r in rows if "ref_err" in r]
    if errs:
        print(f"max relative difference fused vs reference outputs (bf16): {max(errs):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
