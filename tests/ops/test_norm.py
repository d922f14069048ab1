"""ops.rms_norm: the dispatch between the Triton kernels and torch, and the model's RMSNorm using it.

On CPU, ``auto`` and ``reference`` run torch (fp32 statistics for bf16); ``fused`` runs the Triton
kernels through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) and agrees with them."""
import pytest
import torch
import torch.nn.functional as F
from ratplus_kernels.rmsnorm import naive_rms_norm

from megatron_ratplus.ops import norm as norm_ops
from megatron_ratplus.ops import rms_norm


def _grads(backend, x, w):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = rms_norm(x, w, 1e-6, backend=backend)
    y.float().square().sum().backward()
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_agree_with_the_reference(dtype):
    x = torch.randn(5, 3, 48).to(dtype)
    w = (1 + 0.1 * torch.randn(48)).to(dtype)
    want = _grads("auto", x, w)
    torch.testing.assert_close(want[0].float(), naive_rms_norm(x, w, 1e-6).float(), rtol=1e-2, atol=1e-2)
    for backend in ("reference", "fused"):
        got = _grads(backend, x, w)
        for g, r in zip(got, want):
            assert g.dtype == r.dtype
            scale = r.float().abs().max()        # bf16: within a few units of the largest value's last bit
            torch.testing.assert_close(g.float() / scale, r.float() / scale, rtol=2e-2, atol=2e-2)


def test_auto_picks_triton_only_for_cuda_tensors_that_fit(monkeypatch):
    calls = []
    monkeypatch.setattr(norm_ops, "_FUSED", lambda x, w, eps: calls.append(x.shape) or x)
    x, w = torch.randn(2, 8), torch.ones(8)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), F.rms_norm(x, (8,), w, eps=1e-6))
    assert calls == []                                       # CPU tensor: torch
    rms_norm(x, w, 1e-6, backend="fused")
    assert calls == [(2, 8)]
    wide = torch.randn(1, norm_ops._MAX_FUSED_COLUMNS + 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        rms_norm(x, w, 1e-6, backend="triton")
    assert norm_ops._MAX_FUSED_COLUMNS > 0 and wide.shape[-1] > norm_ops._MAX_FUSED_COLUMNS


def test_model_norm_follows_the_kernel_backend(monkeypatch):
    from types import SimpleNamespace

    from megatron_ratplus.model.norm import RMSNorm

    seen = []
    monkeypatch.setattr("megatron_ratplus.model.norm.rms_norm",
                        lambda x, w, eps, backend: seen.append((backend, eps)) or x)
    config = SimpleNamespace(use_cpu_initialization=True, params_dtype=torch.float32, sequence_parallel=False,
                             ratplus_kernel_backend="reference")
    RMSNorm(config, 16, eps=1e-5)(torch.zeros(2, 16))
    assert seen == [("reference", 1e-5)]


def test_with_residual_dispatch():
    """Reference path: the residual is x itself (autograd adds the gradients); the Triton path: a
    view of x whose gradient the norm's backward adds. Same values and gradients either way."""
    from megatron_ratplus.ops import rms_norm_with_residual

    x0, w = torch.randn(3, 4, 32), 1 + 0.1 * torch.randn(32)
    results = {}
    for backend in ("auto", "reference", "fused"):
        x = x0.clone().requires_grad_()
        y, residual = rms_norm_with_residual(x, w, 1e-6, backend=backend)
        assert (residual is x) == (backend != "fused")
        assert residual.data_ptr() == x.data_ptr()
        (y.square().sum() + (3 * residual).sum()).backward()
        results[backend] = (y.detach(), x.grad)
    for backend in ("reference", "fused"):
        for got, want in zip(results[backend], results["auto"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
