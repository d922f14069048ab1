"""Core attention of the RAT+ layer: dense causal or sparse (D, W, P) (DESIGN.md §1 step 5)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from ratplus_kernels.dilated_attention import sparse_mask

from ..attention_pattern import SparsePattern
from ._backend import BACKENDS, load_fused, use_fused
from .flash_attn import installed_flash_attention

_FUSED = load_fused("dilated_attention", "fused_dilated_attention")


def _to_bhtd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0, 3)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Causal softmax attention: the ``flash-attn`` package where it is installed and applies
    (CUDA, bf16/fp16; :mod:`.flash_attn`), else PyTorch SDPA (flash/cuDNN backends on GPU).
    ``backend="reference"`` always takes SDPA.

    ``[T, B, H, D]`` in and out; the output is contiguous so ``view(T, B, H*D)`` is free.
    """
    if backend not in BACKENDS:
        raise ValueError(f"dense_causal_attention: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "reference":
        flash = installed_flash_attention()
        if flash is not None and flash.applies(q):
            return flash(q, k, v, scale)
    out = F.scaled_dot_product_attention(_to_bhtd(q), _to_bhtd(k), _to_bhtd(v), is_causal=True,
                                         scale=scale)
    return out.permute(2, 0, 1, 3).contiguous()


def masked_sparse_attention(q, k, v, pattern: SparsePattern, scale: Optional[float] = None):
    """Reference: SDPA with the boolean (D, W, P) mask. Memory O(T^2) for the mask; CPU/tests."""
    mask = sparse_mask(q.shape[0], pattern.dilation, pattern.window, pattern.initial, device=q.device)
    out = F.scaled_dot_product_attention(_to_bhtd(q), _to_bhtd(k), _to_bhtd(v), attn_mask=mask,
                                         scale=scale)
    return out.permute(2, 0, 1, 3).contiguous()


def ratplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      pattern: Optional[SparsePattern], scale: Optional[float] = None,
                      backend: str = "auto") -> torch.Tensor:
    """Dense causal attention when ``pattern`` is None or dense (D == 1), else sparse attention.
    ``backend``: "auto" / "fused" / "reference" (reference: SDPA for dense, the masked reference
    for sparse).

    Sparse runs the fused Triton kernel on CUDA (walks only the allowed key blocks) and the
    masked-dense reference elsewhere.
    """
    if pattern is None or pattern.is_dense:
        return dense_causal_attention(q, k, v, scale, backend)
    if use_fused(backend, q, _FUSED, "ratplus_attention"):
        return _FUSED(q, k, v, pattern.dilation, pattern.window, pattern.initial, scale=scale)
    return masked_sparse_attention(q, k, v, pattern, scale)
