"""A sequential-scan PyTorch implementation with a hand-written backward, for CPUs.

Same signature and semantics as ``naive_gated_recurrence``. Autograd through a Python loop over
time records ~10 nodes per step; this version runs the forward loop without recording, keeps the
states, and runs the reverse-time recurrence of the gradient in its own loop:

    delta_t = dy_t + a_{t+1} * delta_{t+1}          (delta: gradient w.r.t. the state h_t)
    dx_t    = (1 - a_t) * delta_t
    dg_t    = a_t (1 - a_t) * sum_streams delta_t * (h_{t-1} - x_t)
    dh_init = a_0 * delta_0

That makes it the fastest exact option on CPU (the demo and the CPU test-suite train with it);
GPUs use the fused Triton kernel.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .grad_destination import GradDestination, route_grads_into
from .naive import State, _check_inputs, _state_dtype


class _ScanRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, k, v, k0, v0):
        T, B, H, D = g.shape
        dt = _state_dtype(g)
        a = torch.sigmoid(g.to(dt))
        x = torch.stack([k.to(dt), v.to(dt)], dim=1)               # [T, 2, B, H, D]
        h = torch.empty((T + 1, 2, B, H, D), dtype=dt, device=g.device)
        h[0, 0] = k0
        h[0, 1] = v0
        one_minus = 1.0 - a
        for t in range(T):
            torch.addcmul(one_minus[t] * x[t], a[t], h[t], out=h[t + 1])
        ctx.save_for_backward(a, x, h)
        ctx.dtypes = (g.dtype, k.dtype, v.dtype, k0.dtype)
        return h[1:, 0].to(k.dtype), h[1:, 1].to(v.dtype), h[T, 0].clone(), h[T, 1].clone()

    @staticmethod
    def backward(ctx, dk_out, dv_out, dk_last, dv_last):
        a, x, h = ctx.saved_tensors
        g_dtype, k_dtype, v_dtype, s_dtype = ctx.dtypes
        T = a.shape[0]
        dt = a.dtype
        dy = torch.stack([dk_out.to(dt) if dk_out is not None else torch.zeros_like(x[:, 0]),
                          dv_out.to(dt) if dv_out is not None else torch.zeros_like(x[:, 1])], dim=1)
        delta = torch.stack([dk_last.to(dt) if dk_last is not None else torch.zeros_like(h[0, 0]),
                             dv_last.to(dt) if dv_last is not None else torch.zeros_like(h[0, 1])])
        deltas = torch.empty_like(x)
        for t in range(T - 1, -1, -1):
            delta = delta + dy[t]
            deltas[t] = delta
            delta = a[t] * delta
        dx = (1.0 - a).unsqueeze(1) * deltas
        da = (deltas * (h[:-1] - x)).sum(dim=1)
        dg = da * a * (1.0 - a)
        return (dg.to(g_dtype), dx[:, 0].to(k_dtype), dx[:, 1].to(v_dtype),
                delta[0].to(s_dtype), delta[1].to(s_dtype))


def scan_gated_recurrence(
    g: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    grad_destination: Optional[GradDestination] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[State]]:
    _check_inputs(g, k, v)
    g, k, v = route_grads_into(grad_destination, g, k, v)
    T, B, H, D = g.shape
    dt = _state_dtype(g)
    if initial_state is None:
        k0 = torch.zeros(B, H, D, dtype=dt, device=g.device)
        v0 = torch.zeros_like(k0)
    else:
        k0, v0 = initial_state
    ko, vo, kT, vT = _ScanRecurrence.apply(g, k, v, k0, v0)
    return ko, vo, ((kT, vT) if output_final_state else None)
