#!/usr/bin/env python
"""Decoding speed and cache memory of the Hugging Face RAT+ model with the compact sparse cache.

For each model size, context length T and attention configuration (dense, D=16/W=256/P=4, D=64),
the cache is brought to T tokens, then single-token decoding steps are timed (median over
``--steps`` after ``--warmup``). Prints a markdown table: cache entries per layer, KV-cache memory
(keys + values of all layers and sequences, plus the recurrence states), ms per decoding step,
tokens/s (batch x steps / time).

Cache fill (``--fill``):
  * ``random`` (default): every layer's cache receives T random keys/values through the same
    insertion code that prefill uses, and a random recurrence state. The cache then has exactly the
    structure it has after a real prefill; decoding cost does not depend on the values. Use it on
    CPU, where a real 64K prefill of the 125m model takes too long.
  * ``prefill``: run the model over T random tokens in chunks of ``--prefill-chunk`` (real prefill).

Examples::

    python tools/bench/bench_decode.py                                  # tiny + 125m, 4K/16K/64K, CPU
    python tools/bench/bench_decode.py --models 125m --device cuda --dtype bfloat16 --fill prefill
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_args import names_arg, positive_ints_arg  # noqa: E402

from megatron_ratplus.argtypes import positive_int as positive_int_arg  # noqa: E402
from megatron_ratplus.hf import RATPlusConfig, RATPlusForCausalLM  # noqa: E402
from megatron_ratplus.hf.modeling_ratplus import compact_cache_entries  # noqa: E402

def _preset_dims(name: str) -> dict:
    """Dimensions of the ``ratplus-<name>`` preset of megatron_ratplus.model.presets."""
    from megatron_ratplus.model.presets import PRESETS
    p = PRESETS[f"ratplus-{name}"]
    return dict(num_hidden_layers=p["num_layers"], hidden_size=p["hidden_size"],
                num_attention_heads=p["num_attention_heads"], vocab_size=p["vocab_size"])


MODELS = {"tiny": lambda: _preset_dims("tiny"), "125m": lambda: _preset_dims("125m")}
SETTINGS = {
    "dense": None,
    "D16/W256/P4": (16, 256, 4),
    "D64": (64, 0, 0),
}


def build(model: str, setting: str, dtype, device):
    pattern = SETTINGS[setting]
    D, W, P = pattern or (64, 0, 0)
    cfg = RATPlusConfig(**MODELS[model](), dilation=D, local_window=W, initial_tokens=P,
                        attention_mode="dense" if pattern is None else "sparse", max_position_embeddings=4096)
    torch.manual_seed(0)
    return RATPlusForCausalLM(cfg).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def fill_random(model, cache, T: int, steps: int, chunk: int = 4096, batch: int = 1):
    cfg = model.config
    H, dh = cfg.num_attention_heads, cfg.head_dim
    p = next(model.parameters())
    g = torch.Generator(device=p.device).manual_seed(0)
    for layer in cache.layers:
        template = torch.empty(batch, H, 1, dh, dtype=p.dtype, device=p.device)
        if layer.pattern is None:   # dense: reserve once instead of doubling
            layer._reserve(template, T + steps + 8)
        for start in range(0, T, chunk):
            n = min(chunk, T - start)
            k = torch.randn(batch, H, n, dh, generator=g, dtype=torch.float32, device=p.device).to(p.dtype)
            v = torch.randn(batch, H, n, dh, generator=g, dtype=torch.float32, device=p.device).to(p.dtype)
            layer.insert(k, v)
        if cfg.recurrence:
            layer.state = tuple(torch.randn(batch, H, dh, generator=g, device=p.device) for _ in range(2))


@torch.no_grad()
def fill_prefill(model, cache, T: int, chunk: int, batch: int = 1):
    p = next(model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (batch, T), device=p.device)
    for start in range(0, T, chunk):
        model(ids[:, start:start + chunk], past_key_values=cache, logits_to_keep=1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_decode(model, cache, warmup: int, steps: int, device, batch: int = 1):
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        logits = model(ids, past_key_values=cache).logits
        ids = logits[:, -1:].argmax(-1)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def profile_steps(a, dtype, device, steps: int = 4):
    """Where the host time of a decoding step goes (syncs, plan building, launches)."""
    from ratplus_kernels.dilated_attention import decode as decode_mod
    from torch.profiler import ProfilerActivity, profile

    model_name, T = a.models[0], a.contexts[0]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ours = decode_mod.DECODE_SDPA_BACKENDS
    try:
        for backends in (ours, None):
            decode_mod.DECODE_SDPA_BACKENDS = backends
            for setting in a.settings:
                model = build(model_name, setting, dtype, device)
                cache = model.new_cache()
                fill_prefill(model, cache, T, a.prefill_chunk)
                time_decode(model, cache, 2, 2, device)
                with profile(activities=acts) as prof:
                    sec = time_decode(model, cache, 0, steps, device)
                print(f"## {model_name} T={T} {setting} SDPA backends {backends}: {sec * 1e3:.2f} ms / token")
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))
    finally:
        decode_mod.DECODE_SDPA_BACKENDS = ours


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=names_arg(list(MODELS)), default="tiny,125m")
    ap.add_argument("--contexts", type=positive_ints_arg, default="4096,16384,65536")
    ap.add_argument("--settings", type=names_arg(list(SETTINGS)), default=",".join(SETTINGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--fill", default="random", choices=["random", "prefill"])
    ap.add_argument("--prefill-chunk", type=positive_int_arg, default=2048)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=positive_int_arg, default=8)
    ap.add_argument("--batch", type=positive_int_arg, default=1, help="sequences decoded together")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="only profile a few decoding steps (first model and context, every setting, "
                         "SDPA backends: ours, then PyTorch's choice) and print the top operators")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# decode benchmark — {dev_name}, torch {torch.__version__}, {a.dtype}, batch {a.batch}, "
          f"cache fill: {a.fill}{' (random keys/values through the cache insertion code, no model prefill)' if a.fill == 'random' else ''}, "
          f"median of {a.steps} steps after {a.warmup} warm-up, {datetime.date.today()}")
    for name in a.models:
        dims = MODELS[name]()
        print(f"# {name}: {dims['num_hidden_layers']} layers, d={dims['hidden_size']}, "
              f"{dims['num_attention_heads']} heads of {dims['hidden_size'] // dims['num_attention_heads']}, "
              f"vocab {dims['vocab_size']}")
    print()
    if a.profile:
        profile_steps(a, dtype, device)
        return
    print("| model | context T | attention | cache entries / layer | formula | KV cache MiB | "
          "recurrence state KiB | ms / step | tokens/s | speed vs dense | memory vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for model_name in a.models:
        for T in a.contexts:
            dense_row = None
            for setting in a.settings:
                model = build(model_name, setting, dtype, device)
                cache = model.new_cache()
                if a.fill == "random":
                    fill_random(model, cache, T, a.warmup + a.steps, batch=a.batch)
                else:
                    fill_prefill(model, cache, T, a.prefill_chunk, a.batch)
                size = cache.size()
                entries = cache.layers[0].num_entries()
                formula = compact_cache_entries(T, cache.layers[0].pattern)
                sec = time_decode(model, cache, a.warmup, a.steps, device, a.batch)
                row = dict(model=model_name, context=T, setting=setting, entries_per_layer=entries,
                           formula_entries=formula, kv_mib=size["kv_bytes"] / 2**20,
                           state_kib=size["state_bytes"] / 2**10, ms_per_token=sec * 1e3, tokens_per_s=a.batch / sec, batch=a.batch,
                           allocated_mib=size["allocated_bytes"] / 2**20)
                if setting == "dense":
                    dense_row = row
                speed = f"{row['tokens_per_s'] / dense_row['tokens_per_s']:.2f}×" if dense_row else "—"
                mem = f"{row['kv_mib'] / dense_row['kv_mib']:.3f}" if dense_row else "—"
                rows.append(row)
                print(f"| {model_name} | {T} | {setting} | {entries} | {formula} | {row['kv_mib']:.1f} | "
                      f"{row['state_kib']:.0f} | {row['ms_per_token']:.1f} | {row['tokens_per_s']:.1f} | "
                      f"{speed} | {mem} |", flush=True)
                del model, cache
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
