"""GPU time of RMSNorm forward and forward + backward: torch's CUDA ``F.rms_norm`` (what the model
used before) against the Triton kernels of :mod:`ratplus_kernels.rmsnorm`.

    python tools/bench/bench_rmsnorm.py                                   # GPU, the presets' shapes
    TRITON_INTERPRET=1 python tools/bench/bench_rmsnorm.py --shapes 64x2x64 --calls 2   # CPU smoke run

Shapes are Megatron's ``[T, B, d]`` in bf16: the 1.5B model at micro-batch 2 (4096 x 2 x 2048) and
the 2.6B model (4096 x 2 x 2560) by default. GB/s counts the bytes each pass must move: forward
reads x and writes y; forward + backward also reads x and dy and writes dx (the weight is
negligible). GPU time per call: median of ``--calls`` (:mod:`ratplus_kernels.gpu_time`); wall time
on CPU.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_args import sizes_arg
from gpu_timing import median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=sizes_arg, default=[(4096, 2, 2048), (4096, 2, 2560)])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--sweep-warps", default="",
                        help="also time the Triton kernels at these warp counts, e.g. 4,8,16 (default: the kernel's choice)")
    args = parser.parse_args()
    from ratplus_kernels.rmsnorm import fused as fused_module
    from ratplus_kernels.rmsnorm import fused_rms_norm

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    torch_norm = lambda x, w: F.rms_norm(x, (x.shape[-1],), w, eps=1e-6)  # noqa: E731
    triton_norm = lambda x, w: fused_rms_norm(x, w, 1e-6)  # noqa: E731
    rows = [("torch F.rms_norm", torch_norm, None), ("Triton", triton_norm, None)]
    rows += [(f"Triton, {n} warps", triton_norm, n) for n in (int(v) for v in args.sweep_warps.split(",") if v)]
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"device: {name} | bf16 | {'GPU time' if cuda else 'wall time'}, median of {args.calls}")
    print(f"{'shape':<16} {'kernel':<18} {'fwd ms':>8} {'GB/s':>6} {'fwd+bwd ms':>11} {'GB/s':>6} {'vs torch':>9}")
    default_warps = fused_module._num_warps
    for shape in args.shapes:
        numel = torch.Size(shape).numel()
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(shape[-1], device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(shape, device=device, dtype=dtype)
        base = None
        for label, fn, warps in rows:
            def forward():
                with torch.no_grad():
                    fn(x, w)

            def forward_backward():     # autograd.grad: no accumulation into .grad (an extra pass)
                torch.autograd.grad(fn(x, w), (x, w), dy)

            if warps is not None:       # both kernels, forward and backward, at this warp count
                fused_module._num_warps = lambda block, warps=warps: warps
            try:
                ms = [median_ms(f, args.calls, warmup=3 if cuda else 1, cuda=cuda) for f in (forward, forward_backward)]
            finally:
                fused_module._num_warps = default_warps
            base = base or ms[1]
            print(f"{'x'.join(map(str, shape)):<16} {label:<18} {ms[0]:8.4f} {numel * 4 / ms[0] / 1e6:6.0f} "
                  f"{ms[1]:11.4f} {numel * 10 / ms[1] / 1e6:6.0f} {base / ms[1]:8.2f}x")


if __name__ == "__main__":
    main()
