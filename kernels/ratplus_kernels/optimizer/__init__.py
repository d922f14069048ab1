"""AdamW over fp32 master weights that also writes the model's low-precision weights: a reference
(``naive``) and a multi-tensor Triton kernel (``fused``) with the same signature."""
from .naive import naive_adamw_update

__all__ = ["naive_adamw_update"]

try:  # triton is optional for the reference
    from .fused import PreparedAdamWUpdate, fused_adamw_update  # noqa: F401  (re-exported)
    __all__ += ["fused_adamw_update", "PreparedAdamWUpdate"]
except ImportError:  # pragma: no cover - depends on the environment
    pass
