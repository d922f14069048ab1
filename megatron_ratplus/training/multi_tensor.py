"""Device-side stand-ins for Megatron-core's pure-PyTorch multi-tensor fallbacks (no TE, no apex).

Without Transformer-Engine or apex, Megatron-core 0.16 clips gradients with two local helpers:

- ``local_multi_tensor_l2_norm`` reads every parameter's gradient norm to the host (``float()`` per
  tensor, 147 blocking device-to-host copies a step for the 1.5B model) before Megatron reads the
  total once more; after the first read the GPU idles while the host round-trips the rest;
- ``local_multi_tensor_scale`` computes ``src * scale`` into a temporary and copies it back, two
  kernels and two passes per tensor.

torch's ``_foreach`` kernels do both on the device in a few launches: the norm stays a device tensor
(Megatron's own single read of the total remains, as with apex), and the scale is one in-place pass.
:func:`install` swaps them in only where Megatron fell back to its local helpers, so TE/apex
builds (NGC containers) keep their fused kernels.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def foreach_l2_norm(chunk_size: int, noop_flag, tensor_lists: Sequence[List[torch.Tensor]],
                    per_tensor: bool, *args) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Drop-in for ``amp_C.multi_tensor_l2norm``: (total L2 norm as a 1-element fp32 tensor, per-tensor
    norms or None), computed without reading anything to the host."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        raise ValueError("foreach_l2_norm needs at least one tensor")
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    total = torch.linalg.vector_norm(norms).reshape(1)
    return total, (norms if per_tensor else None)


def foreach_scale(chunk_size: int, noop_flag, tensor_lists: Sequence[List[torch.Tensor]],
                  scale: float) -> None:
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` for each pair; in place (one pass)
    where ``dst`` is ``src``, as in gradient clipping."""
    sources, destinations = tensor_lists[0], tensor_lists[1]
    if len(sources) != len(destinations):
        raise ValueError(f"foreach_scale: {len(sources)} sources but {len(destinations)} destinations")
    in_place = [d for s, d in zip(sources, destinations) if s is d]
    if in_place:
        torch._foreach_mul_(in_place, scale)
    pairs = [(s, d) for s, d in zip(sources, destinations) if s is not d]
    if pairs:
        copied = [d for _, d in pairs]
        torch._foreach_copy_(copied, [s for s, _ in pairs])
        if scale != 1.0:
            torch._foreach_mul_(copied, scale)


def install() -> bool:
    """Replace Megatron's local l2-norm and scale fallbacks by the foreach versions, in the modules
    that use them (gradient clipping and the mixed-precision optimizer). Returns whether Megatron
    was using its local fallbacks (False with TE or apex: nothing is changed)."""
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads, optimizer

    local_norm = getattr(megatron_utils, "local_multi_tensor_l2_norm", None)
    local_scale = getattr(megatron_utils, "local_multi_tensor_scale", None)
    if clip_grads.l2_norm_impl not in (local_norm, foreach_l2_norm):
        return False
    clip_grads.l2_norm_impl = foreach_l2_norm
    for module in (clip_grads, optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) in (local_scale, foreach_scale):
            module.multi_tensor_scale_impl = foreach_scale
    return True
