"""Elementwise parts of the RAT+ layer: RoPE on (q, k~) and the output gate.

Each is an autograd Function whose forward and backward run as ``torch.compile``'d functions on
CUDA (one fused kernel each way instead of a chain of memory-bound ops; Megatron's unfused RoPE
recomputes cos/sin and concatenates per call, TE's fused RoPE is optional), and eagerly elsewhere
(compiling on CPU would cost more than it saves for the small CPU models).

Both take optional gradient destinations (``ops.projection_split``): the backward then writes the
gradient of an input that is a block of the fused projection (q, and k in the attention baseline;
the gate's o) straight into its slot of the projection's gradient, inside the same fused kernel,
instead of into a new tensor that the split would copy (a strided copy: slower than the kernel
that produced it).

RoPE is rotate-half over the whole head dimension (DESIGN.md §1), angles ``freqs`` as produced by
Megatron's ``RotaryEmbedding``: ``[s, 1, 1, d_h]``. Its backward is the transposed rotation:
``dx = dy * cos - rotate_half(dy * sin)``. The cos/sin tables are computed once per ``freqs``
tensor (Megatron's rotary embedding caches it, so once per run and sequence length) and read by
the fused kernels: with the angles passed in, the compiler fused cos and sin into the rotation
and evaluated them for every element of q and k (once per batch row and head), which held the
RoPE kernels to about half the device's bandwidth (docs/benchmarks.md).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch
from torch.utils.weak import WeakTensorKeyDictionary

Destination = Optional[Callable[[], Optional[Tuple[torch.Tensor, ...]]]]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def _rope_transposed(dy, cos, sin):
    return dy * cos - _rotate_half(dy * sin)


# freqs tensor -> {dtype: (freqs._version, cos, sin)}. Weak keys compared by identity: a table lives
# exactly as long as its angles, so also for as long as a captured CUDA graph that reads the angles.
_TABLES = WeakTensorKeyDictionary()


def rope_tables(freqs: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cos(freqs)`` and ``sin(freqs)`` (fp32 math) in ``dtype``, computed once per ``freqs``
    tensor and dtype (again if the tensor was modified in place). Inference-mode tensors keep no
    version counter, so their tables are computed on every call."""
    if freqs.is_inference():
        return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
    per_dtype = _TABLES.setdefault(freqs, {})
    entry = per_dtype.get(dtype)
    if entry is None or entry[0] != freqs._version:
        with torch.no_grad():
            entry = (freqs._version, torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
        per_dtype[dtype] = entry
    return entry[1], entry[2]


def _rope_qk_fwd(q, k, cos, sin):
    return _rope(q, cos, sin), _rope(k, cos, sin)


def _rope_one_bwd(dy, cos, sin, out):
    """The transposed rotation of ``dy``, written into ``out`` when given (returns None), else
    returned."""
    dx = _rope_transposed(dy, cos, sin)
    if out is None:
        return dx
    out.copy_(dx)
    return None


def _rope_qk_bwd(dq, dk, cos, sin, q_out, k_out):
    return _rope_one_bwd(dq, cos, sin, q_out), _rope_one_bwd(dk, cos, sin, k_out)


def _gate_fwd(attn, o):
    return attn * torch.sigmoid(o)


def _gate_bwd(dy, attn, o, o_out):
    ct = torch.promote_types(o.dtype, torch.float32)       # fp32 math for bf16/fp16 inputs
    s = torch.sigmoid(o.to(ct))
    dy_s = dy.to(ct) * s
    dattn = dy_s.to(attn.dtype)
    do = (dy_s * attn.to(ct) * (1.0 - s)).to(o.dtype)
    if o_out is None:
        return dattn, do
    o_out.copy_(do)
    return dattn, None


_FUNCTIONS = {"rope_fwd": _rope_qk_fwd, "rope_bwd": _rope_qk_bwd, "gate_fwd": _gate_fwd, "gate_bwd": _gate_bwd}


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    return torch.compile(_FUNCTIONS[name], dynamic=False, fullgraph=True)


def _run(name: str, *args):
    """The compiled function on CUDA, the eager one elsewhere."""
    on_cuda = next(a for a in args if isinstance(a, torch.Tensor)).is_cuda
    return (_compiled(name) if on_cuda else _FUNCTIONS[name])(*args)


def _claim(destination: Destination, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The one slot a destination provides, if it matches ``like`` (shape, dtype, device)."""
    if destination is None:
        return None
    slots = destination()
    if slots is None:
        return None
    (slot,) = slots
    if slot.shape != like.shape or slot.dtype != like.dtype or slot.device != like.device:
        raise ValueError(f"gradient destination {tuple(slot.shape)} {slot.dtype} does not match its input "
                         f"{tuple(like.shape)} {like.dtype}")
    return slot


class _RopeQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, freqs, q_destination, k_destination):
        cos, sin = rope_tables(freqs, q.dtype)
        ctx.save_for_backward(cos, sin)
        ctx.destinations = (q_destination, k_destination)
        ctx.meta = ((q.shape, q.dtype), (k.shape, k.dtype))
        return _run("rope_fwd", q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        (q_shape, q_dtype), (k_shape, k_dtype) = ctx.meta
        dq = torch.zeros(q_shape, dtype=q_dtype, device=cos.device) if dq is None else dq
        dk = torch.zeros(k_shape, dtype=k_dtype, device=cos.device) if dk is None else dk
        q_slot = _claim(ctx.destinations[0], dq)
        k_slot = _claim(ctx.destinations[1], dk)
        gq, gk = _run("rope_bwd", dq, dk, cos.to(dq.dtype), sin.to(dq.dtype), q_slot, k_slot)
        return (q_slot if gq is None else gq), (k_slot if gk is None else gk), None, None, None


class _OutputGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, o, o_destination):
        ctx.save_for_backward(attn, o)
        ctx.o_destination = o_destination
        return _run("gate_fwd", attn, o)

    @staticmethod
    def backward(ctx, dy):
        attn, o = ctx.saved_tensors
        o_slot = _claim(ctx.o_destination, o)
        dattn, do = _run("gate_bwd", dy, attn, o, o_slot)
        return dattn, (o_slot if do is None else do), None


def rope_qk(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor,
            q_grad_destination: Destination = None, k_grad_destination: Destination = None):
    """Rotate q and k (``[s, b, h, d]``) by ``freqs`` (``[s, 1, 1, d]``); the destinations, if
    given, receive dq / dk (one slot each)."""
    return _RopeQK.apply(q, k, freqs, q_grad_destination, k_grad_destination)


def output_gate(attn: torch.Tensor, o: torch.Tensor, o_grad_destination: Destination = None) -> torch.Tensor:
    """``attn * sigmoid(o)``; the destination, if given, receives do."""
    return _OutputGate.apply(attn, o, o_grad_destination)
