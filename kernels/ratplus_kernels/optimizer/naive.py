"""Pure-PyTorch reference of the AdamW update with a low-precision model copy (same signature as
:func:`.fused.fused_adamw_update`).

Mixed-precision training keeps fp32 master weights and moments in the optimizer and bf16 weights
in the model. Without Transformer-Engine or apex, Megatron-core updates them in two passes: torch's
AdamW over the master weights, then a copy of each master weight into the model's bf16 weight.
The contract both implementations share::

    step    += 1                                   (each tensor's own 0-d fp32 step count)
    grad     = grad * grad_scale                   (in registers; the stored gradient is unchanged)
    param   *= 1 - lr * weight_decay               (decoupled weight decay, as torch.optim.AdamW)
    exp_avg  = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad**2
    param   -= lr / (1 - beta1**step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)
    model_param = param.to(model_param.dtype)      (where a model copy is given)

Every tensor is fp32 and contiguous except the model copies (one low-precision dtype, contiguous).
Tensors are updated in place; nothing is returned. ``grad_scale`` is gradient clipping's coefficient,
applied inside the update instead of by a separate pass that rewrites every gradient (1.0: none).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_adamw_lists(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                      steps: Sequence[torch.Tensor], model_params: Sequence[Optional[torch.Tensor]]) -> None:
    """Raise ValueError naming the first tensor that breaks the contract above."""
    n = len(params)
    for name, values in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                         ("steps", steps), ("model_params", model_params)):
        if len(values) != n:
            raise ValueError(f"adamw update: {n} params but {len(values)} {name}")
    low_dtypes = {m.dtype for m in model_params if m is not None}
    if len(low_dtypes) > 1:
        raise ValueError(f"adamw update: the model copies mix dtypes {sorted(map(str, low_dtypes))}")
    device = params[0].device if n else None
    for i, (p, g, m, v, s, low) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, model_params)):
        for name, t in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v), ("step", s), ("model copy", low)):
            if t is not None and t.device != device:
                raise ValueError(f"adamw update: {name} {i} is on {t.device}, param 0 on {device}")
        for name, t in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"adamw update: {name} {i} must be a contiguous fp32 tensor, got "
                                 f"{t.dtype}{'' if t.is_contiguous() else ', strided'}")
            if t.numel() != p.numel():
                raise ValueError(f"adamw update: {name} {i} has {t.numel()} elements, param {p.numel()}")
        if s.numel() != 1 or s.dtype != torch.float32:
            raise ValueError(f"adamw update: step {i} must be a one-element fp32 tensor")
        if low is not None and (low.numel() != p.numel() or not low.is_contiguous()
                                or low.dtype not in (torch.bfloat16, torch.float16)):
            raise ValueError(f"adamw update: model copy {i} must be a contiguous bf16/fp16 tensor of "
                             f"{p.numel()} elements, got {low.dtype} with {low.numel()}")


def check_grad_scale(grad_scale: float) -> None:
    """Clipping only shrinks gradients: a coefficient outside (0, 1] (or not finite) is a caller's bug."""
    if not 0.0 < grad_scale <= 1.0:
        raise ValueError(f"adamw update: grad_scale must lie in (0, 1], got {grad_scale}")


@torch.no_grad()
def naive_adamw_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                       steps: Sequence[torch.Tensor], model_params: Sequence[Optional[torch.Tensor]],
                       *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                       grad_scale: float = 1.0) -> None:
    """One tensor at a time, in torch ops (the oracle in tests)."""
    check_adamw_lists(params, grads, exp_avgs, exp_avg_sqs, steps, model_params)
    check_grad_scale(grad_scale)
    for p, g, m, v, s, low in zip(params, grads, exp_avgs, exp_avg_sqs, steps, model_params):
        if grad_scale != 1.0:
            g = g * grad_scale
        s.add_(1)
        step = float(s)
        p.mul_(1.0 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / (1.0 - beta2 ** step) ** 0.5).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** step))
        if low is not None:
            low.view(-1).copy_(p.view(-1))
