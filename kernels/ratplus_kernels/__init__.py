"""ratplus_kernels: standalone kernels for RAT+ (depends only on torch and triton).

Organised like flash-linear-attention: each op has a ``naive`` PyTorch reference next to the fused
Triton implementation with the same signature. The import name is deliberately not ``kernels``
(transformers probes a package of that name).
"""
from . import dilated_attention, optimizer, recurrence, rmsnorm
from .dilated_attention import *  # noqa: F401,F403  (each subpackage defines __all__)
from .optimizer import *  # noqa: F401,F403
from .recurrence import *  # noqa: F401,F403
from .rmsnorm import *  # noqa: F401,F403

__all__ = list(recurrence.__all__) + list(dilated_attention.__all__) + list(optimizer.__all__) + list(rmsnorm.__all__)
