"""Compute ops of the RAT+ layer with backend dispatch.

``gated_recurrence`` and ``ratplus_attention`` pick the fused Triton kernels from
``ratplus_kernels`` for CUDA tensors when they are importable, and clear PyTorch references
otherwise (CPU, or ``backend="reference"``). Both take Megatron's time-first ``[T, B, H, D]``
layout (strided views are fine), so the layer never transposes around the call. ``rms_norm``
dispatches the same way (Triton on CUDA, torch elsewhere).
"""
from .attention import dense_causal_attention, ratplus_attention
from .norm import rms_norm, rms_norm_with_residual
from .recurrence import gated_recurrence

__all__ = ["gated_recurrence", "ratplus_attention", "dense_causal_attention", "rms_norm", "rms_norm_with_residual"]
