"""GPU time of one mixed-precision AdamW step over a preset's parameters: torch's fused AdamW plus
Megatron's copy of the master weights into the bf16 model weights, against the one-pass Triton
update (:mod:`ratplus_kernels.optimizer`).

    python tools/bench/bench_optimizer.py                            # ratplus-1.5b, GPU
    TRITON_INTERPRET=1 python tools/bench/bench_optimizer.py --preset ratplus-tiny --calls 2   # CPU smoke run

The parameter tensors have the preset's shapes (fused input projection, output projection, FFN,
norms, embedding, LM head), fp32 master weights, grads and moments, bf16 model weights. Rows:

* ``torch fused AdamW``: ``torch.optim.AdamW(fused=True).step()`` alone;
* ``+ per-tensor copy``: then one ``copy_`` per tensor into the bf16 weights (Megatron's distributed
  optimizer without TE/apex);
* ``+ foreach copy``: the same copy as one ``torch._foreach_copy_`` (Megatron's float16 optimizer
  with this package's foreach fallback);
* ``fused update (Triton)``: the one-pass update that writes the bf16 weights itself.

GB/s counts the bytes each row must move (fp32 AdamW: 16 read + 12 written per parameter; the copy:
4 read + 2 written), so the rows compare against the device's copy bandwidth. GPU time per step:
median of ``--calls`` (:mod:`ratplus_kernels.gpu_time`); wall time on CPU.
"""
from __future__ import annotations

import argparse

import torch
from gpu_timing import median_ms

from megatron_ratplus.model import get_preset


def preset_shapes(name: str) -> list[tuple[int, ...]]:
    """Weight shapes of a preset, one entry per Megatron parameter tensor (no biases)."""
    a = get_preset(name)
    d, ffn = a.hidden_size, 4 * a.hidden_size
    blocks = 5 if a.recurrence else 4
    layer = [(d,), (blocks * d, d), (d, d), (d,), (ffn, d), (d, ffn)]
    return [(a.vocab_size, d)] + layer * a.num_layers + [(d,), (a.vocab_size, d)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ratplus-1.5b")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    from ratplus_kernels.optimizer import fused_adamw_update

    shapes = preset_shapes(args.preset)
    numel = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator(device=device).manual_seed(0)

    def tensors(dtype=torch.float32):
        return [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in shapes]

    master = tensors()
    for p, g in zip(master, tensors()):
        p.grad = g
    model = [p.to(torch.bfloat16) for p in master]
    hyper = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW(master, fused=cuda, foreach=not cuda, **hyper)
    torch_adamw.step()                                       # create the moments
    steps = [torch_adamw.state[p]["step"] for p in master]
    moments = [torch_adamw.state[p]["exp_avg"] for p in master]
    squares = [torch_adamw.state[p]["exp_avg_sq"] for p in master]
    grads = [p.grad for p in master]

    def per_tensor_copy():
        torch_adamw.step()
        for low, p in zip(model, master):
            low.copy_(p)

    def foreach_copy():
        torch_adamw.step()
        torch._foreach_copy_(model, master)

    def fused():
        fused_adamw_update(master, grads, moments, squares, steps, model, lr=1e-4, beta1=0.9, beta2=0.95,
                           eps=1e-8, weight_decay=0.1)

    rows = [("torch fused AdamW" if cuda else "torch foreach AdamW", torch_adamw.step, 28),
            ("+ per-tensor copy", per_tensor_copy, 34), ("+ foreach copy", foreach_copy, 34),
            ("fused update (Triton)", fused, 30)]
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"device: {name} | preset {args.preset}: {len(shapes)} tensors, {numel:,} parameters | "
          f"{'GPU time' if cuda else 'wall time'}, median of {args.calls}")
    print(f"{'update':<24} {'ms':>9} {'GB/s':>8} {'vs torch + per-tensor copy':>28}")
    results = {}
    for label, fn, bytes_per_param in rows:
        ms = median_ms(fn, args.calls, warmup=3 if cuda else 1, cuda=cuda)
        results[label] = ms
        base = results.get("+ per-tensor copy")
        ratio = f"{base / ms:.2f}x" if base else "—"
        print(f"{label:<24} {ms:9.3f} {numel * bytes_per_param / ms / 1e6:8.0f} {ratio:>28}")


if __name__ == "__main__":
    main()
