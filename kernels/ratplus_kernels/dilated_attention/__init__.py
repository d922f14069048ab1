"""RAT+ dilated attention: masked-dense reference (``naive``) and the fused Triton kernel."""
from .naive import naive_dilated_attention, sparse_mask, validate_pattern

__all__ = ["naive_dilated_attention", "sparse_mask", "validate_pattern"]
