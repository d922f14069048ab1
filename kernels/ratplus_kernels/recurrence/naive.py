"""Pure-PyTorch references for the RAT+ gated recurrence.

The recurrence (DESIGN.md §1, per channel, gate shared by the key and value streams)::

    a_t = sigmoid(g_t)
    k~_t = a_t * k~_{t-1} + (1 - a_t) * k_t
    v~_t = a_t * v~_{t-1} + (1 - a_t) * v_t          k~_{-1} = v~_{-1} = initial state (default 0)

Layout contract shared with the fused Triton kernel (same signature):

* ``g, k, v``: ``[T, B, H, D]`` time-first (Megatron's sequence-first layout). Any strides on the
  T/B/H dims are accepted (views of the fused input projection), the last dim may be strided too
  here, but the fused kernel wants it contiguous.
* the state is carried in fp32 (fp64 for fp64 inputs) whatever the input dtype; outputs are cast back to the dtype of
  ``k``/``v`` (bf16 in training).
* ``initial_state``: optional ``(k0, v0)``, each ``[B, H, D]``.
* returns ``(k_out, v_out, final_state)``; ``final_state`` is ``(k_T, v_T)`` in fp32 ``[B, H, D]``
  when ``output_final_state`` else ``None``.
* ``grad_destination``: optional provider of the tensors that receive ``dg, dk, dv`` in the
  backward (:mod:`.grad_destination`); the fused kernel writes them in place, these copy.

Two references live here: ``naive_gated_recurrence`` is the literal loop over time (the oracle in
tests), ``chunked_gated_recurrence`` is a numerically stable chunked form that runs fast enough on
CPU to train small models (sequential over chunks, a masked decay matrix inside each chunk).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .grad_destination import GradDestination, route_grads_into

State = Tuple[torch.Tensor, torch.Tensor]


def _check_inputs(g: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not (g.shape == k.shape == v.shape):
        raise ValueError(f"g, k, v must have the same shape [T, B, H, D], got {tuple(g.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if g.dim() != 4:
        raise ValueError(f"expected 4-D [T, B, H, D] inputs, got {g.dim()}-D")


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 inputs (gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def naive_gated_recurrence(
    g: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    grad_destination: Optional[GradDestination] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[State]]:
    """Literal time loop in fp32. Slow; the ground truth for every other implementation."""
    _check_inputs(g, k, v)
    g, k, v = route_grads_into(grad_destination, g, k, v)
    T, B, H, D = g.shape
    dt = _state_dtype(g)
    a = torch.sigmoid(g.to(dt))
    if initial_state is None:
        hk = torch.zeros(B, H, D, dtype=dt, device=g.device)
        hv = torch.zeros_like(hk)
    else:
        hk, hv = initial_state[0].to(dt), initial_state[1].to(dt)
    k_out, v_out = [], []
    for t in range(T):
        hk = a[t] * hk + (1.0 - a[t]) * k[t].to(dt)
        hv = a[t] * hv + (1.0 - a[t]) * v[t].to(dt)
        k_out.append(hk)
        v_out.append(hv)
    if T == 0:
        ko = k.new_empty(k.shape)
        vo = v.new_empty(v.shape)
    else:
        ko = torch.stack(k_out).to(k.dtype)
        vo = torch.stack(v_out).to(v.dtype)
    final = (hk, hv) if output_final_state else None
    return ko, vo, final


def chunked_gated_recurrence(
    g: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    grad_destination: Optional[GradDestination] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[State]]:
    """Chunked exact form: O(T * C * D) work, T / C sequential steps, stable in fp32.

    Inside a chunk of length C, with ``L_t = sum_{r<=t} log a_r`` (local cumulative log-decay)::

        h_t = exp(L_t) * h_in + sum_{s<=t} exp(L_t - L_s) * (1 - a_s) * x_s

    ``L_t - L_s <= 0`` for ``s <= t`` so every exponent is bounded; the masked ``[C, C]`` decay
    matrix is built per channel. Keys and values share the decay so they go through one einsum.
    """
    _check_inputs(g, k, v)
    g, k, v = route_grads_into(grad_destination, g, k, v)
    T, B, H, D = g.shape
    dt = _state_dtype(g)
    logsig = torch.nn.functional.logsigmoid(g.to(dt))             # log a_t
    w_in = -torch.expm1(logsig)                                   # 1 - a_t, accurate near a=1
    x = torch.stack([k.to(dt), v.to(dt)], dim=0) * w_in            # [2, T, B, H, D]
    if initial_state is None:
        h = torch.zeros(2, B, H, D, dtype=dt, device=g.device)
    else:
        h = torch.stack([initial_state[0].to(dt), initial_state[1].to(dt)], dim=0)
    outs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        C = end - start
        cum = torch.cumsum(logsig[start:end], dim=0)              # [C, B, H, D]
        diff = cum.unsqueeze(1) - cum.unsqueeze(0)                # [t, s, B, H, D] = L_t - L_s
        causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
        decay = torch.where(causal[:, :, None, None, None], diff, float("-inf")).exp()
        y = torch.einsum("tsbhd,nsbhd->ntbhd", decay, x[:, start:end])
        y = y + cum.exp().unsqueeze(0) * h.unsqueeze(1)
        outs.append(y)
        h = y[:, -1]
    if T == 0:
        y_all = torch.zeros(2, 0, B, H, D, dtype=dt, device=g.device)
    else:
        y_all = torch.cat(outs, dim=1)
    final = (h[0], h[1]) if output_final_state else None
    return y_all[0].to(k.dtype), y_all[1].to(v.dtype), final
