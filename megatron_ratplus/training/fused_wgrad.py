"""Weight-gradient GEMMs that accumulate into Megatron's fp32 ``main_grad`` without apex.

Megatron-core's linear layers can add each weight gradient to the fp32 gradient buffer inside the
GEMM (``gradient_accumulation_fusion``) through apex's ``fused_weight_gradient_mlp_cuda`` extension.
Without apex (a pip install rather than the NGC container) the flag cannot be set. Every weight
gradient is then first written in bf16, rounded once per micro-batch, and added to ``main_grad`` by
DDP's hook in a separate elementwise pass: one more launch and about 12 bytes per parameter per
micro-batch, 147 kernels and ~6 ms of a 1.5B model's step on an H200.

torch 2.8+ has a cuBLAS GEMM with bf16 inputs and an fp32 output (``torch.addmm(..., out_dtype=)``),
so the same fusion needs no extension. This module provides the two functions Megatron calls, with
apex's signatures, and registers them with Megatron's linear layers when apex's are missing.
Transformer-Engine layers fuse the accumulation themselves and do not use them.
"""
from __future__ import annotations

import types

import torch


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output.T @ total_input`` for 2-D activations, an fp32 ``main_grad``
    (``[out_features, in_features]``), accumulated in fp32 by the GEMM itself."""
    if main_grad.is_cuda and total_input.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)
    else:
        # CPU (CPU mode, tests) and fp32 activations: the same sum in main_grad's precision.
        wgrad_gemm_accum_fp16(total_input, grad_output, main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The same sum in ``main_grad``'s own precision (a bf16/fp16 ``main_grad`` when
    ``grad_reduce_in_fp32`` is off)."""
    main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


TORCH_WGRAD_EXTENSION = types.SimpleNamespace(
    __name__="megatron_ratplus.fused_wgrad (torch)",
    wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32,
    wgrad_gemm_accum_fp16=wgrad_gemm_accum_fp16,
)


def fused_gemm_works(device: torch.device) -> bool:
    """Whether the fp32-output GEMM runs on ``device`` and accumulates into its output in place: a
    small probe against an fp32 reference (older torch lacks ``out_dtype``; some GPUs/builds too)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=generator).to(device, torch.bfloat16)
    dy = torch.randn(64, 32, generator=generator).to(device, torch.bfloat16)
    grad = torch.randn(32, 48, generator=generator).to(device)
    expected = grad + dy.float().t() @ x.float()
    try:
        wgrad_gemm_accum_fp32(x, dy, grad)
    except (RuntimeError, TypeError):
        return False
    return bool(torch.allclose(grad, expected, rtol=1e-3, atol=1e-3))


def available(device: torch.device) -> bool:
    """Whether ``gradient_accumulation_fusion`` can be turned on for linear layers on ``device``:
    apex's extension is installed, or this module's GEMM works there."""
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "_grad_accum_fusion_available", False):
        return True
    return fused_gemm_works(device)


def install() -> str:
    """Make Megatron's linear layers accept ``gradient_accumulation_fusion``: keep apex's extension
    when it is there, else register this module's functions. Returns which one is in use."""
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "_grad_accum_fusion_available", False) and hasattr(layers, "fused_weight_gradient_mlp_cuda"):
        return getattr(layers.fused_weight_gradient_mlp_cuda, "__name__", "fused_weight_gradient_mlp_cuda")
    layers.fused_weight_gradient_mlp_cuda = TORCH_WGRAD_EXTENSION
    layers._grad_accum_fusion_available = True
    return TORCH_WGRAD_EXTENSION.__name__


def describe(fused: bool) -> str:
    """One line for the run log: how weight gradients reach the fp32 gradient buffer."""
    if not fused:
        return "unfused (bf16/fp32 weight gradient, then added to main_grad by DDP)"
    from megatron.core.tensor_parallel import layers

    extension = getattr(layers, "fused_weight_gradient_mlp_cuda", None)
    return f"fused into the GEMM ({getattr(extension, '__name__', 'fused_weight_gradient_mlp_cuda')})"
