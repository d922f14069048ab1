"""Run the fused dilated attention's forward and backward once inside the CUDA profiler range, for
Nsight Compute::

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section MemoryWorkloadAnalysis \
        python3 tools/bench/profile_dilated.py [--pattern 64/0/0 --forward single_pass]

The first calls (the first-use choices, compilation, warm-up) run outside the range, so only the
kernels of one forward and one backward are profiled. ``--forward`` / ``--backward`` force a
candidate of the W = 0 first-use choices (``W0_FORWARD`` / ``W0_BACKWARD``) instead of timing them.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_args import pattern_arg
from bench_dilated_attention import DH, H
from gpu_timing import profile_once


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--pattern", type=pattern_arg, default=(64, 0, 0), help="D/W/P (default 64/0/0)")
    ap.add_argument("--forward", default="auto", choices=["auto", "blocks", "single_pass"],
                    help="W = 0 forward (default: timed on first use)")
    ap.add_argument("--backward", default="auto",
                    choices=["auto", "split", "split_dq_w0", "single_pass", "single_pass_tma"],
                    help="W = 0 backward (default: timed on first use)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    import ratplus_kernels.dilated_attention.fused as fm

    fm.W0_FORWARD.mode = args.forward
    fm.W0_BACKWARD.mode = args.backward
    q, k, v, do = (torch.randn(args.seq_len, args.batch, H, DH, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)

    def step():
        out = fm.fused_dilated_attention(q, k, v, *args.pattern)
        torch.autograd.grad(out, (q, k, v), do)

    profile_once(step)
    print(f"profiled one forward + backward at B={args.batch} T={args.seq_len} D/W/P={args.pattern} "
          f"({H}x{DH} heads, bf16); kernels: {sorted(fm._LAST_KERNELS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
