"""Time of one RAT+ layer through the training code path, against the DESIGN.md §4 anchors.

    python tools/bench/bench_layer.py                      # GPU: B=4, T=4096, d=2048, 16 heads, bf16
    python tools/bench/bench_layer.py --profile            # + the top kernels of one forward+backward
    python tools/bench/bench_layer.py --batch 1 --seq-len 128 --hidden 128 --heads 2 --steps 3   # CPU

"RAT+ layer" is what DESIGN.md §1 steps 1-6 define and what its anchors time: RMSNorm, the fused
input projection, the recurrence, RoPE, attention, the output gate, the output projection and the
residual add. It is built as Megatron's ``TransformerLayer`` from this package's spec and run
through ``TransformerLayer._forward_attention``, the half of the block that the training model runs
for it; ``--with-ffn`` also times the whole block (``TransformerLayer.forward``: + RMSNorm + FFN).

Variants (``--variants``, comma list):

* ``ratplus-dense``: RAT+ in dense mode (anchor 8.93 ms, target <= 6.5 ms),
* ``ratplus-d64``: sparse D=64, W=0, P=0, the joint-training sparse step (anchor 8.13, target <= 4.5),
* ``ratplus-d16w256p4``: sparse D=16, W=256, P=4, the adapted inference pattern (no anchor),
* ``attention-dense``: the attention baseline, recurrence off (anchor 6.07, "attention-only layer").

Per variant: median forward and forward+backward ms (forward with autograd recording, as in
training; backward to the input and every weight through ``torch.autograd.grad``, so no gradient
accumulation kernels are timed), model TFLOP/s of forward+backward (3x the forward's matmul FLOPs:
projections, and attention over the allowed (query, key) pairs only), and the ratio to the anchor.
On CUDA the times are GPU time (:mod:`ratplus_kernels.gpu_time`: L2 flushed, host launch time
excluded, as under a busy training step); on CPU wall time (a smoke run, not a benchmark).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from gpu_timing import median_ms

from megatron_ratplus.attention_pattern import SparsePattern


@dataclass(frozen=True)
class Variant:
    recurrence: bool
    mode: str                                  # "dense" or "sparse"
    pattern: tuple = (64, 0, 0)                # (D, W, P) used in sparse mode
    anchor_ms: float | None = None          # DESIGN.md §4, reference code, one H100
    target_ms: float | None = None


VARIANTS = {
    "ratplus-dense": Variant(True, "dense", anchor_ms=8.93, target_ms=6.5),
    "ratplus-d64": Variant(True, "sparse", (64, 0, 0), anchor_ms=8.13, target_ms=4.5),
    "ratplus-d16w256p4": Variant(True, "sparse", (16, 256, 4)),
    "attention-dense": Variant(False, "dense", anchor_ms=6.07),
}


def variants_arg(text: str) -> list[str]:
    """Comma list of variant names; an argparse type, so a typo is a usage error naming it."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown or text!r}; choose from {', '.join(VARIANTS)}")
    return names


def model_args(variant: Variant, batch_args):
    """The one-layer architecture of a variant at the command line's size."""
    from megatron_ratplus.model import RATPlusModelArgs

    D, W, P = variant.pattern
    return RATPlusModelArgs(num_layers=1, hidden_size=batch_args.hidden, num_attention_heads=batch_args.heads,
                            vocab_size=128, max_seq_len=batch_args.seq_len, recurrence=variant.recurrence,
                            dilation=D, local_window=W, initial_tokens=P, attention_mode=variant.mode)


def layer_flops(args, batch: int, seq_len: int, with_ffn: bool = False) -> float:
    """Model FLOPs of forward+backward (3x forward) of one layer of ``args`` (its projection blocks,
    its attention mode and sparse pattern), plus the FFN with ``with_ffn``."""
    tokens = batch * seq_len
    d = args.hidden_size
    matmul = 2.0 * tokens * d * d * (args.num_projection_blocks + 1)
    if with_ffn:
        matmul += 2.0 * tokens * d * args.ffn_size * (3 if args.ffn_type == "swiglu" else 2)
    pattern = args.patterns()[0] if args.attention_mode == "sparse" else SparsePattern(1, 0, 0)
    attention = 4.0 * args.head_dim * args.num_attention_heads * batch * pattern.allowed_pairs(seq_len)
    return 3.0 * (matmul + attention)


def build_layer(args, a, device: torch.device, dtype: torch.dtype):
    """One TransformerLayer of ``args`` from the package's spec, and the RoPE angles the model
    would pass it."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from megatron_ratplus.model import to_transformer_config
    from megatron_ratplus.model.specs import (
        get_ratplus_layer_local_spec,
        get_ratplus_layer_te_spec,
        resolve_spec_name,
    )

    cpu = device.type == "cpu"
    config = to_transformer_config(args, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                   use_cpu_initialization=cpu, kernel_backend=a.kernel_backend)
    spec = get_ratplus_layer_te_spec() if resolve_spec_name(a.spec) == "te" else get_ratplus_layer_local_spec()
    layer = build_module(spec, config=config, layer_number=1).to(device)
    rope = RotaryEmbedding(kv_channels=args.head_dim, rotary_percent=1.0, rotary_base=args.rope_base,
                           use_cpu_initialization=cpu)
    return layer, rope(a.seq_len).to(device)


def profile_top_kernels(fn, top: int, calls: int = 3) -> list[tuple[str, float, float]]:
    """(kernel name, ms per call, share of the GPU time) of the ``top`` costliest CUDA kernels."""
    from gpu_timing import cuda_kernels, profiled

    kernels = sorted(cuda_kernels(profiled(fn, calls, warmup=2)), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in kernels)
    return [(e.key, e.device_time_total / calls / 1e3, e.device_time_total / total) for e in kernels[:top]]


def run_variant(name: str, a, device: torch.device, dtype: torch.dtype) -> dict:
    variant = VARIANTS[name]
    args = model_args(variant, a)
    layer, freqs = build_layer(args, a, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(a.seq_len, a.batch, a.hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(a.seq_len, a.batch, a.hidden, device=device, dtype=dtype, generator=gen)
    params = [p for p in layer.parameters() if p.requires_grad]
    attention_params = [p for n, p in layer.named_parameters()
                        if p.requires_grad and not n.startswith(("mlp.", "pre_mlp_layernorm."))]

    def attention_fwd():
        return layer._forward_attention(x, attention_mask=None, rotary_pos_emb=freqs)[0]

    def block_fwd():
        out = layer(x, attention_mask=None, rotary_pos_emb=freqs)
        return out[0] if isinstance(out, tuple) else out

    def fwd_bwd(forward, weights):
        def step():
            torch.autograd.grad(forward(), [x] + weights, dy)
        return step

    cuda = device.type == "cuda"
    row = {"name": name, "variant": variant,
           "fwd": median_ms(attention_fwd, a.steps, a.warmup, cuda),
           "fwd_bwd": median_ms(fwd_bwd(attention_fwd, attention_params), a.steps, a.warmup, cuda),
           "flops": layer_flops(args, a.batch, a.seq_len)}
    if a.with_ffn:
        row["block_fwd_bwd"] = median_ms(fwd_bwd(block_fwd, params), a.steps, a.warmup, cuda)
        row["block_flops"] = layer_flops(args, a.batch, a.seq_len, with_ffn=True)
    if a.profile and cuda:
        row["kernels"] = profile_top_kernels(fwd_bwd(attention_fwd, attention_params), a.profile_top)
    return row


ANCHOR_SHAPE = (4, 4096, 2048, 16)            # B, T, d, heads of DESIGN.md §4


def _tflops(flops: float, ms: float) -> str:
    return f"{flops / ms / 1e9:.3g}"


def format_rows(rows: list[dict], with_ffn: bool, at_anchor_shape: bool) -> list[str]:
    """The table; anchor ratios and targets only where the shape is the anchors' shape."""
    head = "| variant | fwd ms | fwd+bwd ms | TFLOP/s | anchor ms | vs anchor | target ms | target met |"
    sep = "|---|---|---|---|---|---|---|---|"
    if with_ffn:
        head += " block fwd+bwd ms | block TFLOP/s |"
        sep += "---|---|"
    lines = [head, sep]
    for r in rows:
        v: Variant = r["variant"]
        anchor = f"{v.anchor_ms:.2f}" if v.anchor_ms else "—"
        ratio = f"{v.anchor_ms / r['fwd_bwd']:.2f}x" if v.anchor_ms and at_anchor_shape else "—"
        target = f"{v.target_ms:.1f}" if v.target_ms else "—"
        met = ("yes" if r["fwd_bwd"] <= v.target_ms else "no") if v.target_ms and at_anchor_shape else "—"
        line = (f"| {r['name']} | {r['fwd']:.3f} | {r['fwd_bwd']:.3f} | {_tflops(r['flops'], r['fwd_bwd'])} "
                f"| {anchor} | {ratio} | {target} | {met} |")
        if with_ffn:
            line += f" {r['block_fwd_bwd']:.3f} | {_tflops(r['block_flops'], r['block_fwd_bwd'])} |"
        lines.append(line)
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--variants", type=variants_arg, default=list(VARIANTS),
                    help=f"comma list of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--steps", type=int, default=30, help="timed calls per measurement (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--with-ffn", action="store_true", help="also time the whole block (+ RMSNorm + FFN)")
    ap.add_argument("--spec", default="local", choices=["auto", "local", "te"])
    ap.add_argument("--kernel-backend", default="auto", choices=["auto", "fused", "reference"])
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--profile", action="store_true", help="print the costliest CUDA kernels of each variant")
    ap.add_argument("--profile-top", type=int, default=12)
    a = ap.parse_args(argv)
    for field in ("batch", "seq_len", "hidden", "heads", "steps"):
        if getattr(a, field) < 1:
            ap.error(f"--{field.replace('_', '-')} must be >= 1, got {getattr(a, field)}")
    if a.hidden % a.heads:
        ap.error(f"--hidden {a.hidden} is not divisible by --heads {a.heads}")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    from megatron_ratplus.parallel import ParallelLayout, destroy_distributed, initialize_distributed

    info = initialize_distributed(ParallelLayout(), seed=1234)
    device = torch.device("cpu") if info["cpu_mode"] else torch.device("cuda", torch.cuda.current_device())
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("fp32" if info["cpu_mode"] else "bf16")]
    name = "CPU" if info["cpu_mode"] else torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}; B={a.batch}, T={a.seq_len}, d={a.hidden}, "
          f"{a.heads} heads x {a.hidden // a.heads}, {str(dtype).replace('torch.', '')}, spec={a.spec}, "
          f"kernels={a.kernel_backend}")
    at_anchor_shape = (a.batch, a.seq_len, a.hidden, a.heads) == ANCHOR_SHAPE
    print("anchors: DESIGN.md §4, the reference code on one H100 at B=4, T=4096, d=2048, 16 heads"
          + ("" if at_anchor_shape else " (not this shape: no ratios or target checks)"))
    rows = []
    try:
        for variant in a.variants:
            rows.append(run_variant(variant, a, device, dtype))
            print(f"  {variant}: fwd+bwd {rows[-1]['fwd_bwd']:.3f} ms", flush=True)
    finally:
        destroy_distributed()
    print("\n".join(format_rows(rows, a.with_ffn, at_anchor_shape)))
    for r in rows:
        if "kernels" in r:
            print(f"\n{r['name']}: costliest kernels of one forward+backward (ms per call, share)")
            for kname, ms, share in r["kernels"]:
                print(f"  {ms:8.3f} {share:6.1%}  {kname[:110]}")


if __name__ == "__main__":
    main()
