"""RMSNorm that works under Megatron sequence parallelism.

Megatron's torch-norm fallback (``WrappedTorchNorm``) refuses ``sequence_parallel``; TE and apex
norms handle it but are optional here. With sequence parallelism each TP rank normalises its own
slice of the sequence, so the weight's gradient is only a partial sum: marking the parameter with
``sequence_parallel = True`` makes Megatron's ``finalize_model_grads`` all-reduce it over the TP
group, exactly as it does for TE norms.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from ..ops.norm import rms_norm, rms_norm_with_residual
from .residual import offer_residual


class RMSNorm(MegatronModule):
    """``y = x / sqrt(mean(x^2) + eps) * weight``, statistics in fp32, weight initialised to 1.

    The kernel follows the model's kernel backend (:func:`megatron_ratplus.ops.rms_norm`: Triton on
    CUDA, torch's ``rms_norm`` with ``reference`` and on CPU).

    ``link_residual`` (the layer's input and pre-MLP norms, from the layer spec): when gradients are
    recorded, also offer the layer's bias-dropout-add a view of ``x`` whose gradient the norm's
    backward adds into ``x``'s (:mod:`.residual`), instead of autograd adding it in a kernel of its own.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, link_residual: bool = False, **kwargs):
        super().__init__(config=config)
        self.eps = eps
        self.link_residual = link_residual
        self.kernel_backend = getattr(config, "ratplus_kernel_backend", "auto")
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.link_residual and torch.is_grad_enabled() and x.requires_grad:
            y, residual = rms_norm_with_residual(x, self.weight, self.eps, backend=self.kernel_backend)
            offer_residual(x, residual)
            return y
        return rms_norm(x, self.weight, self.eps, backend=self.kernel_backend)
