"""RAT+ gated recurrence: references (``naive``) and the fused Triton kernel (``fused``)."""
from .fused import fused_gated_recurrence
from .naive import chunked_gated_recurrence, naive_gated_recurrence

__all__ = ["chunked_gated_recurrence", "fused_gated_recurrence", "naive_gated_recurrence"]
