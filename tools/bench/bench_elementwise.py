"""GPU time of the RAT+ layer's fused RoPE on q and k at the model's shape: cos/sin evaluated inside
the compiled kernel (the formulation before) against the precomputed tables ``ops.elementwise``
passes in now.

    python tools/bench/bench_elementwise.py                    # GPU, the 1.5B model at 2 x 4096 tokens
    python tools/bench/bench_elementwise.py --tokens 64 --hidden 64 --heads 2 --calls 2   # CPU smoke run

GB/s counts the bytes each pass must move in bf16: the forward reads q, k and writes both, the
backward the same with the gradients (the tables are a few KB per position, cached). GPU time per
call: median of ``--calls`` (:mod:`ratplus_kernels.gpu_time`); wall time on CPU.
"""
from __future__ import annotations

import argparse

import torch
from gpu_timing import median_ms


def _row(label, ms, bytes_per_pass, base):
    cols = "".join(f" {m:9.4f} {b / m / 1e6:6.0f}" for m, b in zip(ms, bytes_per_pass))
    return f"{label:<34}{cols} {base / ms[-1]:8.2f}x"


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
    print(f"RoPE on q, k [{tokens}, 2, {heads}, {head_dim}] bf16")
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
    parser.add_argument("--hidden", type=int, default=2048, help="model width d (heads x head dim)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    warmup = 3 if cuda else 1
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device: {name} | bf16 | {'GPU time' if cuda else 'wall time'}, median of {args.calls}\n")
    bench_rope(args.tokens, args.heads, args.hidden // args.heads, args.calls, warmup, cuda, device)


if __name__ == "__main__":
    main()
