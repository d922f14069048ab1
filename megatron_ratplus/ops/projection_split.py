"""The fused input projection's output split into its blocks, with the gradient assembled in place.

The RAT+ layer's projection writes ``[s, b, heads x blocks x d_h]`` (head-interleaved: see
``model/attention.py``) and the layer consumes the blocks (o, q, k, v, g) as strided views.
Autograd's backward of such a split (``unbind``, ``split``) stacks the blocks' gradients into a new
tensor: a copy of the whole projection gradient, about 3.6% of a RAT+ layer's forward+backward on
an H200 (docs/benchmarks.md, layer benchmark).

Here the split's gradient is one buffer in the projection's layout, owned by a
:class:`ProjectionGradient`. Consumers that can write their gradients straight into its block
slots ask for them through :meth:`ProjectionGradient.destination` (the recurrence kernels write
``dg, dk, dv`` there); the split's backward copies in only the gradients that arrived elsewhere and
returns the buffer. Any gradient that is not exactly its slot (another consumer's, or a sum that
autograd formed because a block was used twice) is copied, so the result never depends on which
consumers took part.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch


def _is_slot(grad: torch.Tensor, slot: torch.Tensor) -> bool:
    return (grad.data_ptr() == slot.data_ptr() and grad.shape == slot.shape
            and grad.stride() == slot.stride() and grad.dtype == slot.dtype)


class ProjectionGradient:
    """The gradient buffer of one split projection output, ``[s, b, heads, blocks, d_h]``.

    Created by :func:`split_projection` for each forward; the buffer is allocated by the first
    consumer backward that asks for slots (or by the split's backward) and released when the
    split's backward hands it to autograd.
    """

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = device
        self._buffer: Optional[torch.Tensor] = None
        self._claimed: set = set()

    def _get_buffer(self) -> torch.Tensor:
        if self._buffer is None:
            self._buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._buffer

    def destination(self, blocks: Sequence[int]) -> Callable[[], Optional[Tuple[torch.Tensor, ...]]]:
        """A provider, called in a consumer's backward, of the slots of ``blocks`` (views
        ``[s, b, heads, d_h]`` with the strides of the forward's block views); None when one of
        them was already handed out in this backward (the block has another consumer)."""
        blocks = tuple(blocks)

        def provide():
            if any(i in self._claimed for i in blocks):
                return None
            self._claimed.update(blocks)
            buffer = self._get_buffer()
            return tuple(buffer.select(3, i) for i in blocks)
        return provide

    def assemble(self, grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """The whole gradient from the blocks' gradients (None: the block was not used). When no
        consumer wrote a slot, the blocks are stacked (one vectorised copy, as autograd's own
        ``unbind`` backward does) rather than copied slot by slot (strided writes)."""
        buffer, self._buffer, self._claimed = self._buffer, None, set()
        if buffer is None:
            return torch.stack([torch.zeros(self.shape[:3] + self.shape[4:], dtype=self.dtype, device=self.device)
                                if g is None else g for g in grads], dim=3)
        for i, grad in enumerate(grads):
            slot = buffer.select(3, i)
            if grad is None:
                slot.zero_()
            elif not _is_slot(grad, slot):
                slot.copy_(grad)
        return buffer


class _SplitProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected, num_heads, num_blocks, head_dim, gradient):
        ctx.gradient = gradient
        ctx.projected_shape = projected.shape
        s, b = projected.shape[:2]
        return projected.view(s, b, num_heads, num_blocks, head_dim).unbind(3)

    @staticmethod
    def backward(ctx, *grads):
        return ctx.gradient.assemble(grads).view(ctx.projected_shape), None, None, None, None


def split_projection(projected: torch.Tensor, num_heads: int, num_blocks: int, head_dim: int
                     ) -> Tuple[Tuple[torch.Tensor, ...], ProjectionGradient]:
    """``[s, b, heads * blocks * d_h]`` -> the blocks as ``[s, b, heads, d_h]`` strided views, and
    the :class:`ProjectionGradient` through which consumers may write their gradients in place."""
    s, b, width = projected.shape
    if width != num_heads * num_blocks * head_dim:
        raise ValueError(f"projection width {width} is not heads x blocks x head_dim = "
                         f"{num_heads} x {num_blocks} x {head_dim}")
    gradient = ProjectionGradient((s, b, num_heads, num_blocks, head_dim), projected.dtype, projected.device)
    blocks = _SplitProjection.apply(projected, num_heads, num_blocks, head_dim, gradient)
    return tuple(blocks), gradient
