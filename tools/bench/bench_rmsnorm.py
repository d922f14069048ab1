"""GPU time of RMSNorm forward and forward + backward: torch's CUDA ``F.rms_norm`` (what the model
used before) against the Triton kernels of :mod:`ratplus_kernels.rmsnorm`.

    python tools/bench/bench_rmsnorm.py                                   # GPU, the presets' shapes
    TRITON_INTERPRET=1 python tools/bench/bench_rmsnorm.py --shapes 64x2x64 --calls 2   # CPU smoke run

Shapes are Megatron's ``[T, B, d]`` in bf16: the 1.5B model at micro-batch 2 (4096 x 2 x 2048) and
the 2.6B model (4096 x 2 x 2560) by default. GB/s counts the bytes each pass must move: forward
reads x and writes y; forward + backward also reads x and dy and writes dx (the weight is
negligible). GPU time per call: median of ``--calls`` (:mod:`ratplus_kernels.gpu_time`); wall time
on CPU.

The "+ residual" rows time the norm as the layer uses it, with the input also taken as the block's
residual branch: torch's norm with autograd summing the two gradients of x (a separate add), against
``fused_rms_norm_with_residual`` (the sum inside the backward); their backward also reads the
residual's gradient (counted in GB/s). ``--sweep-programs`` and ``--sweep-loop`` time the Triton
backward at other numbers of programs per SM and other row loops (rows per iteration and
software-pipelining depth).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_args import int_pairs_arg, positive_ints_arg, sizes_arg
from gpu_timing import median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=sizes_arg, default=[(4096, 2, 2048), (4096, 2, 2560)])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--sweep-warps", type=positive_ints_arg, default=[],
                        help="also time the Triton kernels at these warp counts, e.g. 4,8,16 (default: the kernel's choice)")
    parser.add_argument("--sweep-programs", type=positive_ints_arg, default=[],
                        help="also time the Triton kernels with these backward programs per SM, e.g. 2,8,16")
    parser.add_argument("--sweep-loop", type=int_pairs_arg, default=[],
                        help="also time the Triton backward with these row loops, ROWS:STAGES pairs, e.g. 2:1,1:2")
    args = parser.parse_args()
    if any(rows & (rows - 1) for rows, _ in args.sweep_loop):
        parser.error(f"--sweep-loop: rows per iteration must be powers of two (a Triton tile), got {args.sweep_loop}")
    from ratplus_kernels.rmsnorm import fused as fused_module
    from ratplus_kernels.rmsnorm import fused_rms_norm, fused_rms_norm_with_residual

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    torch_norm = lambda x, w: F.rms_norm(x, (x.shape[-1],), w, eps=1e-6)  # noqa: E731
    triton_norm = lambda x, w: fused_rms_norm(x, w, 1e-6)  # noqa: E731
    torch_residual = lambda x, w: (torch_norm(x, w), x)  # noqa: E731
    triton_residual = lambda x, w: fused_rms_norm_with_residual(x, w, 1e-6)  # noqa: E731
    # (label, function, settings of the kernel module to use, whether it returns (y, residual))
    sweeps = [(f"{n} warps", {"_num_warps": lambda block, n=n: n}) for n in args.sweep_warps]
    sweeps += [(f"{n} progs/SM", {"BACKWARD_PROGRAMS_PER_SM": n}) for n in args.sweep_programs]
    sweeps += [(f"rows {r}, stages {st}", {"BACKWARD_ROWS_PER_ITER": r, "BACKWARD_LOOP_STAGES": st})
               for r, st in args.sweep_loop]
    rows = [("torch F.rms_norm", torch_norm, {}, False), ("Triton", triton_norm, {}, False)]
    rows += [(f"Triton, {label}", triton_norm, settings, False) for label, settings in sweeps]
    rows += [("torch + residual", torch_residual, {}, True), ("Triton + residual", triton_residual, {}, True)]
    rows += [(f"Triton + res, {label}", triton_residual, settings, True) for label, settings in sweeps]
    width = max(len(row[0]) for row in rows)
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"device: {name} | bf16 | {'GPU time' if cuda else 'wall time'}, median of {args.calls}")
    print(f"{'shape':<16} {'kernel':<{width}} {'fwd ms':>8} {'GB/s':>6} {'fwd+bwd ms':>11} {'GB/s':>6} {'vs torch':>9}")
    for shape in args.shapes:
        numel = torch.Size(shape).numel()
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(shape[-1], device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(shape, device=device, dtype=dtype)
        dres = torch.randn(shape, device=device, dtype=dtype)
        base = {}
        for label, fn, settings, residual in rows:
            def forward():
                with torch.no_grad():
                    fn(x, w)

            def forward_backward():     # autograd.grad: no accumulation into .grad (an extra pass)
                out = fn(x, w)
                outputs, grads = (out, (dy, dres)) if residual else ((out,), (dy,))
                torch.autograd.grad(outputs, (x, w), grads)

            defaults = {key: getattr(fused_module, key) for key in settings}
            for key, value in settings.items():
                setattr(fused_module, key, value)
            try:
                ms = [median_ms(f, args.calls, warmup=3 if cuda else 1, cuda=cuda) for f in (forward, forward_backward)]
            finally:
                for key, value in defaults.items():
                    setattr(fused_module, key, value)
            ref = base.setdefault(residual, ms[1])
            moved = numel * (12 if residual else 10)
            print(f"{'x'.join(map(str, shape)):<16} {label:<{width}} {ms[0]:8.4f} {numel * 4 / ms[0] / 1e6:6.0f} "
                  f"{ms[1]:11.4f} {moved / ms[1] / 1e6:6.0f} {ref / ms[1]:8.2f}x")


if __name__ == "__main__":
    main()
