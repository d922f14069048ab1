"""RAT+ dilated attention: masked-dense reference (``naive``), the fused Triton kernel (``fused``)
and the decoding path over the compact sparse cache (``decode``)."""
from .decode import decode_attention
from .fused import fused_dilated_attention
from .naive import naive_dilated_attention, sparse_mask, validate_pattern

__all__ = ["decode_attention", "fused_dilated_attention", "naive_dilated_attention", "sparse_mask",
           "validate_pattern"]
