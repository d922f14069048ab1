"""Measure how the recurrence-gate initialisation of a Llama import changes the loss.

``python -m megatron_ratplus.hf.gate_init_study`` (CPU; about 6 minutes on 2 idle cores, the
defaults are the settings of the table in ``conversion.llama_to_ratplus``):

1. builds a corpus from the ``.py`` sources of an installed package (real text, no download) and
   trains a byte-level BPE tokenizer on it;
2. trains a small ``transformers.LlamaForCausalLM`` (GQA) on it from scratch;
3. imports it with :func:`~megatron_ratplus.hf.conversion.llama_to_ratplus`, recurrence off and on
   with every ``gate_init`` rule, and reports the held-out loss of each at import and after a few
   steps of continued training (same data, same optimizer settings for all).
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from .conversion import GATE_INITS, llama_to_ratplus
from .modeling_ratplus import RATPlusForCausalLM


def python_corpus(package: str, max_bytes: int, seed: int = 0) -> str:
    import importlib
    root = Path(importlib.import_module(package).__file__).parent
    files = sorted(root.rglob("*.py"))
    random.Random(seed).shuffle(files)
    parts, size = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "\n\n".join(parts)


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    chunks = [text[i:i + 10000] for i in range(0, len(text), 10000)]
    tok.train_from_iterator(chunks, trainer)
    return tok


def batches(ids: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=gen)
        yield torch.stack([ids[s:s + seq] for s in starts.tolist()])


@torch.no_grad()
def eval_loss(model, data: torch.Tensor) -> float:
    model.eval()
    losses = [model(input_ids=x.unsqueeze(0), labels=x.unsqueeze(0)).loss.item() for x in data]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def mean_gate(model, data: torch.Tensor) -> float:
    """Mean of a = sigmoid(g) over all layers, channels and held-out tokens."""
    vals = []
    hooks = [layer.self_attn.recurrence_gate_proj.register_forward_hook(
        lambda m, i, o: vals.append(torch.sigmoid(o.float()).mean().item())) for layer in model.model.layers]
    model.eval()
    try:
        for x in data[:8]:
            model(input_ids=x.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    model.train()
    return sum(vals) / len(vals)


def train(model, it, steps: int, lr: float, warmup: int = 0):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
        scale *= 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * max(scale, 0.05)
        x = next(it)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", default="transformers", help="installed package whose .py files are the corpus")
    p.add_argument("--corpus-bytes", type=int, default=3_000_000)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--adapt-steps", type=int, default=40)
    p.add_argument("--eval-seqs", type=int, default=48)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers
    t0 = time.time()
    text = python_corpus(a.package, a.corpus_bytes, a.seed)
    tok = train_tokenizer(text, a.vocab)
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    split = int(ids.numel() * 0.95)
    train_ids, held = ids[:split], ids[split:]
    g = torch.Generator().manual_seed(a.seed)
    eval_data = torch.stack([held[s:s + a.seq] for s in
                             torch.randint(0, held.numel() - a.seq, (a.eval_seqs,), generator=g).tolist()])
    print(f"corpus: {len(text) / 1e6:.1f} MB of {a.package} sources, {ids.numel() / 1e6:.2f}M tokens "
          f"(BPE vocab {a.vocab}), {time.time() - t0:.0f}s")

    torch.manual_seed(a.seed)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=128, intermediate_size=352,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=a.seq, rms_norm_eps=1e-6, tie_word_embeddings=False)
    llama = transformers.LlamaForCausalLM(cfg)
    t1 = time.time()
    train(llama, batches(train_ids, a.seq, a.batch, g), a.pretrain_steps, lr=3e-3, warmup=40)
    base = eval_loss(llama, eval_data)
    print(f"Llama (4 layers, d=128, 4 heads / 2 kv heads) trained {a.pretrain_steps} steps × {a.batch}×{a.seq} "
          f"tokens in {time.time() - t1:.0f}s: held-out loss {base:.4f}")

    rows = []
    variants = [("recurrence off", False, "zeros")] + [(f"recurrence on, {gi}", True, gi) for gi in GATE_INITS if gi != "auto"]
    for name, rec, gi in variants:
        extra = {}
        if rec and gi == "calibrated":      # 16 training sequences (not the held-out text)
            extra["calibration_ids"] = next(batches(train_ids, a.seq, 16, torch.Generator().manual_seed(a.seed + 2)))
        sd, rcfg = llama_to_ratplus(llama.state_dict(), llama.config, recurrence=rec, gate_init=gi, **extra)
        model = RATPlusForCausalLM(rcfg)
        model.load_state_dict(sd, strict=True)
        at_import = eval_loss(model, eval_data)
        gate = mean_gate(model, eval_data) if rec else float("nan")
        ga = torch.Generator().manual_seed(a.seed + 1)       # same batches for every variant
        train(model, batches(train_ids, a.seq, a.batch, ga), a.adapt_steps, lr=1e-3)
        after = eval_loss(model, eval_data)
        rows.append((name, gate, at_import, after))
        print(f"  {name:28s} mean a {gate:.3f}  loss at import {at_import:.4f} (+{at_import - base:.4f})   "
              f"after {a.adapt_steps} steps {after:.4f}", flush=True)
    print()
    print(f"| import | mean gate a at import | held-out loss at import | Δ vs Llama | "
          f"after {a.adapt_steps} steps (lr 1e-3) |")
    print("|---|---|---|---|---|")
    print(f"| Llama itself | — | {base:.4f} | 0 | — |")
    for name, gate, at_import, after in rows:
        g = "—" if gate != gate else f"{gate:.3f}"
        print(f"| {name} | {g} | {at_import:.4f} | {at_import - base:+.4f} | {after:.4f} |")
    print(f"\ntotal {time.time() - t0:.0f}s, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
