"""GELU (exact, erf form): a reference (``naive``) and a Triton forward/backward pair (``fused``)
with the same signature."""
from .naive import naive_gelu

__all__ = ["naive_gelu"]

try:  # triton is optional for the reference
    from .fused import fused_gelu  # noqa: F401  (re-exported)
    __all__.append("fused_gelu")
except ImportError:  # pragma: no cover - depends on the environment
    pass
