"""GPU time of the RAT+ block's elementwise ops at the model's shapes: the MLP's GELU (torch's CUDA
kernels against the Triton kernels of :mod:`ratplus_kernels.activation`) and RoPE on q and k (the
cos/sin evaluated inside the fused kernel, as the model did before, against the precomputed tables
``ops.elementwise`` now passes in).

    python tools/bench/bench_elementwise.py                    # GPU, the 1.5B model at 2 x 4096 tokens
    python tools/bench/bench_elementwise.py --gelu-configs 1024x4,4096x8,8192x16   # GELU launch sweep
    TRITON_INTERPRET=1 python tools/bench/bench_elementwise.py --tokens 64 --hidden 64 --heads 2 --calls 2

GB/s counts the bytes each pass must move in bf16: GELU forward reads x and writes y, forward +
backward also reads x and dy and writes dx (5 tensor passes); RoPE forward reads q, k and writes
both, its backward the same with the gradients (the tables are a few KB per position, cached).
GPU time per call: median of ``--calls`` (:mod:`ratplus_kernels.gpu_time`); wall time on CPU.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from gpu_timing import median_ms


def _gelu_configs(text: str) -> list[tuple[int, int]]:
    try:
        configs = [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        configs = [()]
    if any(len(c) != 2 or min(c) < 1 for c in configs):
        raise argparse.ArgumentTypeError(f"expected BLOCKxWARPS,... (e.g. 4096x8), got {text!r}")
    return configs


def _row(label, ms, bytes_per_pass, base):
    cols = "".join(f" {m:9.4f} {b / m / 1e6:6.0f}" for m, b in zip(ms, bytes_per_pass))
    return f"{label:<34}{cols} {base / ms[-1]:8.2f}x"


def bench_gelu(tokens, ffn, calls, warmup, cuda, device, configs):
    from ratplus_kernels.activation import fused as fused_module
    from ratplus_kernels.activation import fused_gelu

    x = torch.randn(tokens, 2, ffn, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    tensor = x.numel() * 2
    print(f"GELU on [{tokens}, 2, {ffn}] bf16 (fc1's output)")
    print(f"{'kernel':<34} {'fwd ms':>9} {'GB/s':>6} {'fwd+bwd ms':>9} {'GB/s':>6} {'vs torch':>9}")
    rows = [("torch F.gelu (exact)", F.gelu, None), ("Triton (default)", fused_gelu, None)]
    rows += [(f"Triton BLOCK={b}, {w} warps", fused_gelu, (b, w)) for b, w in configs]
    default = fused_module.BLOCK, fused_module.NUM_WARPS
    base = None
    for label, fn, config in rows:
        if config:
            fused_module.BLOCK, fused_module.NUM_WARPS = config
        try:
            def forward():
                with torch.no_grad():
                    fn(x)

            def forward_backward():
                torch.autograd.grad(fn(x), x, dy)

            ms = [median_ms(f, calls, warmup=warmup, cuda=cuda) for f in (forward, forward_backward)]
        finally:
            fused_module.BLOCK, fused_module.NUM_WARPS = default
        base = base or ms[1]
        print(_row(label, ms, (2 * tensor, 5 * tensor), base))


def bench_rope(tokens, heads, head_dim, calls, warmup, cuda, device):
    from megatron_ratplus.ops import elementwise

    q = torch.randn(tokens, 2, heads, head_dim, device=device, dtype=torch.bfloat16)
    k, dq, dk = torch.randn_like(q), torch.randn_like(q), torch.randn_like(q)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(tokens, device=device, dtype=torch.float32), inv)
    freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :]
    compile_ = torch.compile if cuda else (lambda f, **_: f)

    def angles_in_kernel(fn):
        """The formulation before the tables: cos/sin of the angles inside the compiled function."""
        def run(a, b, f):
            cos, sin = torch.cos(f).to(a.dtype), torch.sin(f).to(a.dtype)
            return fn(a, b, cos, sin)
        return run

    old_fwd = compile_(angles_in_kernel(elementwise._rope_qk_fwd), dynamic=False, fullgraph=True)
    old_bwd = compile_(angles_in_kernel(lambda a, b, c, s: elementwise._rope_qk_bwd(a, b, c, s, None, None)),
                       dynamic=False, fullgraph=True)
    new_fwd = compile_(elementwise._rope_qk_fwd, dynamic=False, fullgraph=True)
    new_bwd = compile_(elementwise._rope_qk_bwd, dynamic=False, fullgraph=True)
    tensor = q.numel() * 2
    print(f"\nRoPE on q, k [{tokens}, 2, {heads}, {head_dim}] bf16")
    print(f"{'kernel':<34} {'fwd ms':>9} {'GB/s':>6} {'bwd ms':>9} {'GB/s':>6} {'vs before':>9}")
    variants = [
        ("cos/sin inside the kernel (before)", lambda: old_fwd(q, k, freqs), lambda: old_bwd(dq, dk, freqs)),
        ("tables (ops.elementwise)", lambda: new_fwd(q, k, *elementwise.rope_tables(freqs, q.dtype)),
         lambda: new_bwd(dq, dk, *elementwise.rope_tables(freqs, q.dtype), None, None)),
    ]
    base = None
    for label, forward, backward in variants:
        ms = [median_ms(f, calls, warmup=warmup, cuda=cuda) for f in (forward, backward)]
        base = base or ms[1]
        print(_row(label, ms, (4 * tensor, 4 * tensor), base))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="sequence length (micro-batch 2)")
    parser.add_argument("--hidden", type=int, default=2048, help="model width d (GELU runs on 4d)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--gelu-configs", type=_gelu_configs, default=[],
                        help="also time the Triton GELU at these BLOCKxWARPS launches, e.g. 2048x4,4096x8")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    warmup = 3 if cuda else 1
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"device: {name} | bf16 | {'GPU time' if cuda else 'wall time'}, median of {args.calls}\n")
    bench_gelu(args.tokens, 4 * args.hidden, args.calls, warmup, cuda, device, args.gelu_configs)
    bench_rope(args.tokens, args.heads, args.hidden // args.heads, args.calls, warmup, cuda, device)


if __name__ == "__main__":
    main()
