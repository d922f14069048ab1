"""Run the fused recurrence's forward and backward once inside the CUDA profiler range, for Nsight
Compute::

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section MemoryWorkloadAnalysis \
        python3 tools/bench/profile_recurrence.py [--batch 4 --seq-len 4096]

The first calls (autotuning, the per-shape design choice, warm-up) run outside the range, so
only the chosen kernels of one forward and one backward are profiled (ncu replays each one,
restoring the memory it writes: the look-back's flags start from zero in every replay).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_recurrence import D, H, make_inputs
from gpu_timing import profile_once
from ratplus_kernels.recurrence import fused_gated_recurrence


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    x, g, k, v = make_inputs(args.batch, args.seq_len)
    dko = torch.randn(args.seq_len, args.batch, H, D, device="cuda", dtype=x.dtype)
    dvo = torch.randn_like(dko)

    def step():
        ko, vo, _ = fused_gated_recurrence(g, k, v)
        torch.autograd.grad((ko, vo), (g, k, v), (dko, dvo))

    profile_once(step)
    print(f"profiled one forward + backward at B={args.batch} T={args.seq_len} ({H}x{D} heads, bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
