"""The residual branch of a pre-norm block, handed from the norm to the bias-dropout-add.

Megatron's ``TransformerLayer`` computes ``residual = x; h = norm(x); ...; bda(f(h), residual)``.
Both branches read ``x``, so autograd sums the two gradients of ``x`` in a separate elementwise
kernel that reads both and writes the sum (1.5 ms of a 1.5B training pass on an H100). The layer's
norms (``RMSNorm(link_residual=True)``) instead return, beside ``norm(x)``, a view of ``x`` whose
gradient their backward adds into ``x``'s in its own pass
(:func:`megatron_ratplus.ops.rms_norm_with_residual`); that costs one more read there, so the net
saving is 0.01 ms per norm at micro-batch 2 and 0.03 ms per layer at B=4 (docs/benchmarks.md,
"Twenty-first session"). The norm leaves that view here with :func:`offer_residual`, and the
layer's bias-dropout-add (:func:`get_linked_bias_dropout_add`, in the layer spec) uses it in place
of ``x``.

Correctness does not depend on the hand-over: the view has ``x``'s values and its gradient reaches
``x`` through the norm's backward, and the bias-dropout-add takes it only for the very tensor the
norm saw (identity, not equality). Anything else (no grad, the reference kernels, activation
offloading that swaps the tensor, ``apply_residual_connection_post_layernorm``) leaves Megatron's
ordinary path. One slot: a norm and its block's add are adjacent in the layer's forward, and the add
empties the slot whether or not it used it, so no view (and the graph behind it) outlives the block.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

_pending: Optional[tuple[weakref.ref, torch.Tensor]] = None


def offer_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    """Leave ``residual`` (a stand-in for ``x`` in the block's skip connection) for the next add."""
    global _pending
    _pending = (weakref.ref(x), residual) if residual is not x else None


def take_residual(x: torch.Tensor) -> torch.Tensor:
    """The stand-in offered for ``x``, else ``x``; empties the slot either way."""
    global _pending
    entry, _pending = _pending, None
    if entry is not None and entry[0]() is x:
        return entry[1]
    return x


def get_linked_bias_dropout_add(training: bool, fused: bool) -> Callable:
    """Megatron's ``get_bias_dropout_add`` with the residual replaced by the norm's stand-in."""
    bias_dropout_add = get_bias_dropout_add(training, fused)

    def linked_bias_dropout_add(x_with_bias, residual: torch.Tensor, prob: float):
        return bias_dropout_add(x_with_bias, take_residual(residual), prob)

    return linked_bias_dropout_add
