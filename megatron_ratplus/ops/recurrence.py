"""The RAT+ gated recurrence on keys and values (DESIGN.md §1 step 3)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from ratplus_kernels.recurrence import scan_gated_recurrence

from ._backend import load_fused, use_fused

_FUSED = load_fused("recurrence", "fused_gated_recurrence")


def gated_recurrence(
    g: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    output_final_state: bool = False,
    backend: str = "auto",
    grad_destination=None,
):
    """``k~_t = a_t k~_{t-1} + (1 - a_t) k_t`` (and v) with ``a = sigmoid(g)``, state in fp32.

    Inputs ``[T, B, H, D]`` time-first; returns ``(k~, v~, final_state)`` with outputs in the
    input dtype. CUDA tensors use the fused Triton kernel; elsewhere the sequential PyTorch scan
    with a hand-written backward runs (exact, fast on CPU). ``grad_destination``: tensors the
    backward writes ``dg, dk, dv`` into (``ratplus_kernels.recurrence.grad_destination``).
    """
    if use_fused(backend, g, _FUSED, "gated_recurrence"):
        return _FUSED(g, k, v, initial_state=initial_state, output_final_state=output_final_state,
                      grad_destination=grad_destination)
    return scan_gated_recurrence(g, k, v, initial_state=initial_state,
                                 output_final_state=output_final_state, grad_destination=grad_destination)
