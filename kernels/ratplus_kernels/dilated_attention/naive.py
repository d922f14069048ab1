"""Pure-PyTorch reference for RAT+ sparse (dilated) attention: a masked dense softmax.

Query ``t`` may attend key ``j`` iff (DESIGN.md §1)::

    j <= t  and  (t - j <= W  or  j < P  or  (D > 0 and (j + 1) % D == 0))

``D = -1`` is local-only (no chunk-end keys), ``D = 1`` allows every causal key (dense).
A query always sees itself (``t - t = 0 <= W`` since ``W >= 0``).

Layout contract shared with the fused Triton kernel (same signature): ``q, k, v`` are
``[T, B, H, Dh]`` time-first (any strides), the output is ``[T, B, H, Dh]`` in the input dtype and
the optional log-sum-exp is fp32 ``[B, H, T]`` (natural log, of the scaled scores).
"""
from __future__ import annotations

from typing import Optional

import torch


def validate_pattern(dilation: int, window: int, initial: int) -> None:
    """Reject impossible sparse patterns with a message that names the bad value."""
    if not isinstance(dilation, int) or dilation == 0 or dilation < -1:
        raise ValueError(f"dilation D must be a positive integer or -1 (local-only), got {dilation!r}")
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"local window W must be an integer >= 0, got {window!r}")
    if not isinstance(initial, int) or initial < 0:
        raise ValueError(f"initial tokens P must be an integer >= 0, got {initial!r}")


def sparse_mask(seq_len: int, dilation: int, window: int, initial: int,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Boolean ``[T, T]`` mask, ``mask[t, j]`` True where query t may attend key j."""
    validate_pattern(dilation, window, initial)
    t = torch.arange(seq_len, device=device).unsqueeze(1)
    j = torch.arange(seq_len, device=device).unsqueeze(0)
    allowed = (t - j <= window) | (j < initial)
    if dilation > 0:
        allowed = allowed | ((j + 1) % dilation == 0)
    return allowed & (j <= t)


def naive_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dilation: int,
    window: int,
    initial: int,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Masked-dense attention in fp32 (fp64 for fp64 inputs); returns ``out`` or ``(out, lse)``."""
    T, B, H, Dh = q.shape
    scale = Dh ** -0.5 if scale is None else scale
    mask = sparse_mask(T, dilation, window, initial, device=q.device)
    dt = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (x.to(dt).permute(1, 2, 0, 3) for x in (q, k, v))      # [B, H, T, Dh]
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                # [B, H, T]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, vf).permute(2, 0, 1, 3).to(q.dtype)        # [T, B, H, Dh]
    return (out, lse) if return_lse else out
