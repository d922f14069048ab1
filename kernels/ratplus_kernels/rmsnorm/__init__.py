"""RMSNorm over the last dimension with fp32 statistics: a reference (``naive``) and a Triton kernel
pair (``fused``, forward and backward) with the same signature."""
from .naive import naive_rms_norm

__all__ = ["naive_rms_norm"]

try:  # triton is optional for the reference
    from .fused import fused_rms_norm  # noqa: F401  (re-exported)
    __all__.append("fused_rms_norm")
except ImportError:  # pragma: no cover - depends on the environment
    pass
