"""Host time per call of the fused dilated attention (the per-block and the single-pass W = 0
forwards, and each W = 0 backward candidate), beside its GPU time: where eager timings exceed
CUDA-graph timings, this says which launch path costs the host time.

    PYTHONPATH=kernels:. python tools/bench/launch_overhead.py [--calls 200]

Host time: wall-clock of ``--calls`` back-to-back calls without synchronising (the GPU queue
absorbs them), divided by the calls. GPU time: ``triton.testing.do_bench_cudagraph`` median.
Shape: the DESIGN.md anchor (B=4, T=4096, 16 heads x 128, bf16).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

B, T, H, DH = 4, 4096, 16, 128


def host_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def gpu_ms(fn) -> float:
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as e:  # a path that cannot be captured is reported, not fatal
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
        return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import ratplus_kernels.dilated_attention.fused as fm

    q, k, v, do = (torch.randn(T, B, H, DH, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    lse = torch.zeros(B, H, T, device="cuda")
    scale = DH ** -0.5
    rows = []
    fwd_default = fm._fwd_config(DH, torch.bfloat16)
    single = fwd_default.pop("w0")
    forwards = [(f"forward {pattern} TMA={tma}", pattern, dict(fwd_default, TMA=tma))
                for pattern in [(64, 0, 0), (16, 256, 4)] for tma in (False, True, "device")]
    forwards += [(f"forward (64, 0, 0) single pass TMA={tma}", (64, 0, 0),
                  dict(fwd_default, w0=dict(single, TMA=tma))) for tma in (False, True, "device")]
    for label, pattern, cfg in forwards:
        with fm.block_config(fwd=cfg):
            def fwd(pattern=pattern):
                fm._forward(q, k, v, *pattern, scale)
            rows.append((label, host_us(fwd, args.calls), gpu_ms(fwd)))
    out, lse = fm._forward(q, k, v, 64, 0, 0, scale)
    base = fm._bwd_config(DH, torch.bfloat16)
    candidates = [("split", dict(base, w0=None, w0_tma=None)),
                  ("single pass", dict(base, w0=base["w0"], w0_tma=None)),
                  ("single pass, host TMA", dict(base, w0=None, w0_tma=dict(base["w0_tma"], TMA=True))),
                  ("single pass, device TMA", dict(base, w0=None, w0_tma=dict(base["w0_tma"], TMA="device")))]
    for label, cfg in candidates:
        with fm.block_config(bwd=cfg):
            def bwd():
                fm._backward(q, k, v, out, lse, do, None, 64, 0, 0, scale)
            rows.append((f"backward (64, 0, 0) {label}", host_us(bwd, args.calls), gpu_ms(bwd)))
    print(f"launch overhead at B={B} T={T} {H}x{DH} bf16, {args.calls} calls "
          f"(triton {__import__('triton').__version__}, {torch.cuda.get_device_name()})")
    print("| call | host us / call | GPU ms / call (graph) |")
    print("|---|---|---|")
    for label, h, g in rows:
        print(f"| {label} | {h:.1f} | {g:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
