"""Device-side grad norm and scaling (training/multi_tensor.py): the same results as Megatron's local
fallbacks, without reading anything to the host, and installed only where Megatron fell back."""
import math

import pytest
import torch
from megatron.core import utils as megatron_utils
from megatron.core.optimizer import clip_grads, optimizer
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ratplus.training import multi_tensor


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def tensors(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(dtype) for shape in [(7,), (3, 5), (2, 2, 2), (1,)]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_norm_matches_the_definition_and_never_reads_to_the_host(dtype):
    grads = tensors(dtype)
    expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    with RecordOps() as recorded:
        total, per_tensor = multi_tensor.foreach_l2_norm(2048, None, [grads], True)
    assert not any("_local_scalar_dense" in op for op in recorded.ops), "a host read (item/float)"
    assert total.shape == (1,) and total.dtype == torch.float32
    assert float(total) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(per_tensor, torch.stack([g.float().norm() for g in grads]))
    assert multi_tensor.foreach_l2_norm(2048, None, [grads], False)[1] is None


def test_scale_in_place_and_into_other_tensors():
    grads = tensors()
    before = [g.clone() for g in grads]
    multi_tensor.foreach_scale(2048, None, [grads, grads], 0.25)
    for g, b in zip(grads, before):
        torch.testing.assert_close(g, b * 0.25)
    sources, targets = tensors(), [torch.zeros_like(t, dtype=torch.bfloat16) for t in tensors()]
    multi_tensor.foreach_scale(2048, None, [sources, targets], 2.0)
    for s, t in zip(sources, targets):
        torch.testing.assert_close(t, (s * 2.0).to(torch.bfloat16))
    with pytest.raises(ValueError, match="2 sources but 1 destinations"):
        multi_tensor.foreach_scale(2048, None, [sources[:2], targets[:1]], 1.0)


def test_install_replaces_only_megatrons_local_fallbacks(monkeypatch):
    monkeypatch.setattr(clip_grads, "l2_norm_impl", megatron_utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", megatron_utils.local_multi_tensor_scale)
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", megatron_utils.local_multi_tensor_scale)
    assert multi_tensor.install()
    assert clip_grads.l2_norm_impl is multi_tensor.foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is multi_tensor.foreach_scale
    assert optimizer.multi_tensor_scale_impl is multi_tensor.foreach_scale
    assert multi_tensor.install()          # idempotent

    fused = object()                       # as with apex / Transformer-Engine kernels
    monkeypatch.setattr(clip_grads, "l2_norm_impl", fused)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", fused)
    assert not multi_tensor.install()
    assert clip_grads.l2_norm_impl is fused and clip_grads.multi_tensor_scale_impl is fused


def test_megatron_clipping_with_the_replacements(megatron_single_process, monkeypatch):
    """Megatron's own norm and clip functions, through the installed helpers (CPU mode)."""
    monkeypatch.setattr(clip_grads, "l2_norm_impl", multi_tensor.foreach_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", multi_tensor.foreach_scale)
    params = [torch.nn.Parameter(t) for t in tensors()]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    grads = [p.grad for p in params]
    norm = clip_grads.get_grad_norm_fp32(grads)
    numel = sum(p.numel() for p in params)
    assert norm == pytest.approx(3.0 * math.sqrt(numel), rel=1e-6)
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    assert clip_grads.get_grad_norm_fp32(grads) == pytest.approx(1.0, rel=1e-5)
