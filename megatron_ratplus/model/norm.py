"""RMSNorm that works under Megatron sequence parallelism.

Megatron's torch-norm fallback (``WrappedTorchNorm``) refuses ``sequence_parallel``; TE and apex
norms handle it but are optional here. With sequence parallelism each TP rank normalises its own
slice of the sequence, so the weight's gradient is only a partial sum: marking the parameter with
``sequence_parallel = True`` makes Megatron's ``finalize_model_grads`` all-reduce it over the TP
group, exactly as it does for TE norms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class RMSNorm(MegatronModule):
    """``y = x / sqrt(mean(x^2) + eps) * weight``, statistics in fp32, weight initialised to 1.

    ``F.rms_norm`` is one fused kernel on CUDA (fp32 accumulation for bf16 inputs); on CPU the input
    is upcast explicitly so bf16 runs keep fp32 statistics there too.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__(config=config)
        self.eps = eps
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), eps=self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * self.weight.float()).to(x.dtype)
