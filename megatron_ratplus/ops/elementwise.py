"""Elementwise parts of the RAT+ layer: RoPE on (q, k~) and the output gate.

On CUDA they run as ``torch.compile``'d functions, so each becomes one fused kernel forward and
backward instead of a chain of memory-bound ops (Megatron's unfused RoPE recomputes cos/sin and
concatenates per call; TE's fused RoPE is optional). Elsewhere the same eager code runs: compiling
on CPU would cost more than it saves for the small CPU models.

RoPE is rotate-half over the whole head dimension (DESIGN.md §1), angles ``freqs`` as produced by
Megatron's ``RotaryEmbedding``: ``[s, 1, 1, d_h]``.
"""
from __future__ import annotations

import functools

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_qk(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor):
    cos = torch.cos(freqs).to(q.dtype)
    sin = torch.sin(freqs).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _gate(attn: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    return attn * torch.sigmoid(o)


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    fn = {"rope": _rope_qk, "gate": _gate}[name]
    return torch.compile(fn, dynamic=False, fullgraph=True)


def rope_qk(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor):
    """Rotate q and k (``[s, b, h, d]``) by ``freqs`` (``[s, 1, 1, d]``)."""
    fn = _compiled("rope") if q.is_cuda else _rope_qk
    return fn(q, k, freqs)


def output_gate(attn: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``attn * sigmoid(o)``."""
    fn = _compiled("gate") if attn.is_cuda else _gate
    return fn(attn, o)
