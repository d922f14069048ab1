"""RMSNorm over the last dimension with fp32 statistics: a reference (``naive``) and a Triton kernel
pair (``fused``, forward and backward) with the same signature."""
from .naive import naive_rms_norm, naive_rms_norm_with_residual

__all__ = ["naive_rms_norm", "naive_rms_norm_with_residual"]

try:  # triton is optional for the reference
    from .fused import fused_rms_norm, fused_rms_norm_with_residual  # noqa: F401  (re-exported)
    __all__ += ["fused_rms_norm", "fused_rms_norm_with_residual"]
except ImportError:  # pragma: no cover - depends on the environment
    pass
