"""ratplus_kernels: standalone kernels for RAT+ (depends only on torch and triton).

Organised like flash-linear-attention: each op has a ``naive`` PyTorch reference next to the fused
Triton implementation with the same signature. The import name is deliberately not ``kernels``
(transformers probes a package of that name).
"""
from .dilated_attention import naive_dilated_attention, sparse_mask, validate_pattern
from .recurrence import chunked_gated_recurrence, naive_gated_recurrence

__all__ = [
    "naive_gated_recurrence",
    "chunked_gated_recurrence",
    "naive_dilated_attention",
    "sparse_mask",
    "validate_pattern",
]
