"""RAT+ gated recurrence: references (``naive``), a CPU scan (``scan``) and the fused Triton kernel
(``fused``), all with the same signature."""
from .naive import chunked_gated_recurrence, naive_gated_recurrence
from .scan import scan_gated_recurrence

__all__ = ["chunked_gated_recurrence", "naive_gated_recurrence", "scan_gated_recurrence"]

try:  # triton is optional for the references
    from .fused import fused_gated_recurrence  # noqa: F401  (re-exported)
    __all__.append("fused_gated_recurrence")
except ImportError:  # pragma: no cover - depends on the environment
    pass
