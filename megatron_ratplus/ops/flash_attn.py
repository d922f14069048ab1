"""The ``flash-attn`` package for dense causal attention, when it is installed.

PyTorch's SDPA serves dense attention everywhere; where ``flash-attn`` is installed (NGC containers,
or ``pip install flash-attn``), its kernels serve CUDA bf16/fp16 calls instead: FlashAttention-3
(``flash_attn_interface``, built for Hopper) when present, else FlashAttention-2 (``flash_attn``).
Both take ``[B, T, H, Dh]`` tensors with any batch / sequence / head strides, so the time-first
``[T, B, H, Dh]`` activations of the layer go in as transposed views, without a copy.
``RATPLUS_FLASH_ATTN=0`` in the environment keeps SDPA even where flash-attn is installed (the
sparse attention is not affected, unlike ``model.kernel_backend=reference``).
"""
from __future__ import annotations

import importlib
import inspect
import os
from typing import Callable, Optional

import torch

# (module, what it is), in order of preference
_CANDIDATES = (("flash_attn_interface", "FlashAttention-3"), ("flash_attn", "FlashAttention-2"))
_UNSET = object()
_loaded = _UNSET


class FlashAttention:
    """One installed ``flash_attn_func`` and what its signature accepts."""

    def __init__(self, func: Callable, name: str):
        self.func, self.name = func, name
        try:
            self._deterministic = "deterministic" in inspect.signature(func).parameters
        except (TypeError, ValueError):
            self._deterministic = False

    @staticmethod
    def applies(q: torch.Tensor) -> bool:
        """CUDA, 16-bit, a head size the kernels are built for (a multiple of 8 up to 256) and a
        unit stride on it."""
        dh = q.shape[-1]
        return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and dh % 8 == 0
                and dh <= 256 and q.stride(-1) == 1)

    def __call__(self, q, k, v, scale: Optional[float]) -> torch.Tensor:
        """Causal attention of ``[T, B, H, Dh]`` tensors; returns a contiguous ``[T, B, H, Dh]``."""
        kwargs = dict(softmax_scale=scale, causal=True)
        if self._deterministic:
            kwargs["deterministic"] = torch.are_deterministic_algorithms_enabled()
        out = self.func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), **kwargs)
        if isinstance(out, tuple):          # some FlashAttention-3 releases also return the lse
            out = out[0]
        return out.transpose(0, 1).contiguous()


def installed_flash_attention() -> Optional[FlashAttention]:
    """The preferred installed implementation, or None (looked up once per process; None when
    ``RATPLUS_FLASH_ATTN=0``)."""
    global _loaded
    if _loaded is _UNSET:
        _loaded = None
        disabled = os.environ.get("RATPLUS_FLASH_ATTN", "1").strip().lower() in ("0", "false", "no", "off")
        for module, name in () if disabled else _CANDIDATES:
            try:
                func = importlib.import_module(module).flash_attn_func
            # absent, or a build for another torch / CUDA (undefined symbols, version checks)
            except (ImportError, AttributeError, OSError, RuntimeError):
                continue
            _loaded = FlashAttention(func, name)
            break
    return _loaded
