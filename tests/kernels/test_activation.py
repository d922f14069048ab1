"""GELU: the Triton forward/backward against autograd of the torch reference.

On CPU the kernels run under the Triton interpreter (tests/conftest.py) at small shapes: sizes that
are not a multiple of the kernel's block, one element, an empty tensor, a strided input. The ``gpu``
test runs the 1.5B model's MLP shape against the reference and torch's own GELU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ratplus_kernels.activation import fused_gelu, naive_gelu
from ratplus_kernels.activation import fused as fused_module

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, seed, device=DEV):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (3.0 * torch.randn(shape, generator=gen, device=device)).to(dtype)
    dy = torch.randn(shape, generator=gen, device=device).to(dtype)
    return x, dy


def _run(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad


def _close(got, want, dtype, what):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("shape", [(1,), (7, 3), (3, 5, 64), (fused_module.BLOCK + 5,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(shape, dtype):
    x, dy = _inputs(shape, dtype, seed=sum(shape))
    want = _run(naive_gelu, x, dy)
    got = _run(fused_gelu, x, dy)
    for g, r, what in zip(got, want, ("y", "dx")):
        assert g.dtype == r.dtype and g.shape == r.shape, what
        _close(g, r, dtype, what)


def test_reference_is_torch_exact_gelu():
    x, dy = _inputs((64, 33), torch.float32, seed=1, device="cpu")
    for got, want in zip(_run(naive_gelu, x, dy), _run(F.gelu, x, dy)):
        torch.testing.assert_close(got, want)


def test_strided_and_empty_inputs():
    x, dy = _inputs((6, 40), torch.float32, seed=2)
    x_t = x.t().contiguous().t()                    # same values, column-major
    want = _run(naive_gelu, x, dy)
    got = _run(fused_gelu, x_t, dy)
    _close(got[0], want[0], torch.float32, "y")
    _close(got[1], want[1], torch.float32, "dx")
    empty = torch.zeros(0, 8, device=DEV, requires_grad=True)
    y = fused_gelu(empty)
    y.sum().backward()
    assert y.shape == (0, 8) and empty.grad.shape == (0, 8)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="floating-point tensor, got torch.int64"):
        fused_gelu(torch.zeros(4, dtype=torch.long))


@pytest.mark.gpu
def test_gpu_mlp_shape_matches_reference_and_torch():
    """fc1's output of the 1.5B model, [T, B, 4d] = [4096, 2, 8192] bf16, against the fp32
    reference and torch's CUDA GELU (the kernel it replaces); outputs poisoned first."""
    x, dy = _inputs((4096, 2, 8192), torch.bfloat16, seed=3, device="cuda")
    got = _run(fused_gelu, x, dy)
    want = _run(naive_gelu, x, dy)
    torch_gelu = _run(F.gelu, x, dy)
    for g, r, t, what in zip(got, want, torch_gelu, ("y", "dx")):
        assert torch.isfinite(g.float()).all(), what
        _close(g, r, torch.bfloat16, what)
        _close(t, r, torch.bfloat16, f"torch {what}")   # the same tolerance holds for torch's kernel
