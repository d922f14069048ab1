"""RMSNorm: the Triton forward/backward against the autograd of the torch reference.

On CPU the kernels run under the Triton interpreter (tests/conftest.py) at small shapes: rows that
are not a power of two, fewer rows than backward programs, rows that do not divide among them. The
``gpu`` test runs the 1.5B model's shape against the reference and torch's own ``rms_norm``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ratplus_kernels.rmsnorm import (fused_rms_norm, fused_rms_norm_with_residual, naive_rms_norm,
                                     naive_rms_norm_with_residual)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, seed, device=DEV):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (3.0 * torch.randn(shape, generator=gen, device=device)).to(dtype).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(shape[-1], generator=gen, device=device)).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen, device=device).to(dtype)
    return x, w, dy


def _run(fn, x, w, dy, eps=1e-6):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w, eps)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _close(got, want, dtype, what):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    scale = want.float().abs().max().clamp_min(1.0)
    torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 64), (7, 100), (37, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(shape, dtype):
    x, w, dy = _inputs(shape, dtype, seed=len(shape) + shape[-1])
    want = _run(naive_rms_norm, x, w, dy)
    got = _run(fused_rms_norm, x, w, dy)
    for g, r, what in zip(got, want, ("y", "dx", "dweight")):
        assert g.dtype == r.dtype and g.shape == r.shape, what
        _close(g, r, dtype, what)


def test_reference_is_rms_norm():
    x, w, _ = _inputs((4, 32), torch.float32, seed=1, device="cpu")
    torch.testing.assert_close(naive_rms_norm(x, w, 1e-5), F.rms_norm(x, (32,), w, eps=1e-5))


def test_strided_input_and_a_weight_without_grad():
    x, w, dy = _inputs((6, 40), torch.float32, seed=2)
    x_t = x.detach().t().contiguous().t()          # same values, column-major
    w = w.detach()
    want = _run(naive_rms_norm, x, w, dy)
    got_y = fused_rms_norm(x_t.requires_grad_(), w, 1e-6)
    got_y.backward(dy)
    _close(got_y.detach(), want[0], torch.float32, "y")
    _close(x_t.grad, want[1], torch.float32, "dx")


@pytest.mark.parametrize("args, message", [
    (lambda: (torch.zeros(2, 8), torch.ones(7)), "weight must have shape \\(8,\\)"),
    (lambda: (torch.zeros(2, 0), torch.ones(0)), "non-empty last dimension"),
    (lambda: (torch.zeros(2, 8), torch.ones(8, device="meta")), "weight is on meta"),
    (lambda: (torch.zeros(1, 32768), torch.ones(32768)), "exceed the kernel's"),
])
def test_bad_input_is_named(args, message):
    x, w = args()
    with pytest.raises(ValueError, match=message):
        fused_rms_norm(x, w)


@pytest.mark.gpu
def test_gpu_model_shape_matches_reference_and_torch():
    """[T, B, d] = [4096, 2, 2048] bf16, Megatron's layout: against the fp32 reference and torch's
    CUDA rms_norm (the kernel it replaces)."""
    x, w, dy = _inputs((4096, 2, 2048), torch.bfloat16, seed=3, device="cuda")
    got = _run(fused_rms_norm, x, w, dy)
    want = _run(naive_rms_norm, x, w, dy)
    torch_rms = _run(lambda a, b, eps: F.rms_norm(a, (a.shape[-1],), b, eps=eps), x, w, dy)
    for g, r, t, what in zip(got, want, torch_rms, ("y", "dx", "dweight")):
        assert torch.isfinite(g.float()).all(), what
        _close(g, r, torch.bfloat16, what)
        _close(t, r, torch.bfloat16, f"torch {what}")   # the same tolerance holds for torch's kernel


def _run_with_residual(fn, x, w, dy, dres, eps=1e-6):
    """``fn(x) -> (y, residual)`` in a block ``residual * dres + y * dy`` (so both branches carry
    gradients); ``dres=None`` leaves the residual unused."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y, residual = fn(x, w, eps)
    loss = (y.float() * dy.float()).sum()
    if dres is not None:
        loss = loss + (residual.float() * dres.float()).sum()
    loss.backward()
    return y.detach(), residual.detach(), x.grad, w.grad


@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 64), (37, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual_used", [True, False])
def test_with_residual_matches_reference(shape, dtype, residual_used):
    """The residual branch's gradient is summed into dx by the norm's backward (or absent)."""
    x, w, dy = _inputs(shape, dtype, seed=shape[-1] + 7)
    dres = 2.0 * torch.randn(shape, generator=torch.Generator(device=DEV).manual_seed(5), device=DEV).to(dtype)
    dres = dres if residual_used else None
    want = _run_with_residual(naive_rms_norm_with_residual, x, w, dy, dres)
    got = _run_with_residual(fused_rms_norm_with_residual, x, w, dy, dres)
    for g, r, what in zip(got, want, ("y", "residual", "dx", "dweight")):
        assert g.dtype == r.dtype and g.shape == r.shape, what
        _close(g, r, dtype, what)
    torch.testing.assert_close(got[1], x.detach())                        # the residual is x
    if residual_used:                                                     # and its gradient counted
        without = _run_with_residual(fused_rms_norm_with_residual, x, w, dy, None)
        _close(got[2] - without[2], dres, dtype, "dx - dx without the residual")


def test_with_residual_is_a_view_of_the_input():
    x, w, _ = _inputs((4, 16), torch.float32, seed=9)
    _, residual = fused_rms_norm_with_residual(x, w)
    assert residual.data_ptr() == x.data_ptr() and residual.shape == x.shape and residual.requires_grad
    with pytest.raises(ValueError, match="exceed the kernel's"):
        fused_rms_norm_with_residual(torch.zeros(1, 32768), torch.ones(32768))


@pytest.mark.gpu
def test_gpu_with_residual_model_shape():
    x, w, dy = _inputs((4096, 2, 2048), torch.bfloat16, seed=4, device="cuda")
    dres = torch.randn_like(dy)
    got = _run_with_residual(fused_rms_norm_with_residual, x, w, dy, dres)
    want = _run_with_residual(naive_rms_norm_with_residual, x, w, dy, dres)
    for g, r, what in zip(got, want, ("y", "residual", "dx", "dweight")):
        assert torch.isfinite(g.float()).all(), what
        _close(g, r, torch.bfloat16, what)


@pytest.mark.parametrize("rows, stages", [(1, 1), (2, 1), (4, 2)])
def test_backward_row_loops_agree(monkeypatch, rows, stages):
    """Every row loop of the backward (rows per iteration, pipelining depth), with a row count that
    leaves a partial last iteration in some programs."""
    from ratplus_kernels.rmsnorm import fused as fused_module

    monkeypatch.setattr(fused_module, "BACKWARD_ROWS_PER_ITER", rows)
    monkeypatch.setattr(fused_module, "BACKWARD_LOOP_STAGES", stages)
    x, w, dy = _inputs((3, 13, 48), torch.float32, seed=rows)
    dres = torch.randn_like(dy)
    want = _run_with_residual(naive_rms_norm_with_residual, x, w, dy, dres)
    got = _run_with_residual(fused_rms_norm_with_residual, x, w, dy, dres)
    for g, r, what in zip(got, want, ("y", "residual", "dx", "dweight")):
        _close(g, r, torch.float32, what)


def test_pipelining_depth_fits_shared_memory(monkeypatch):
    from ratplus_kernels.rmsnorm import fused as fused_module

    monkeypatch.setattr(fused_module, "BACKWARD_LOOP_STAGES", 3)
    assert fused_module._loop_stages(2048, 1, 3, 2) == 3            # the 1.5B model's rows: 36 KB
    assert fused_module._loop_stages(4096, 1, 3, 2) == 3            # the 2.6B model's (2560 -> 4096): 72 KB
    assert fused_module._loop_stages(8192, 1, 2, 2) == 2            # 32 KB a stage
    assert fused_module._loop_stages(8192, 1, 3, 2) == 1            # 48 KB a stage
    assert fused_module._loop_stages(8192, 1, 2, 4) == 1            # fp32: no prefetching
    monkeypatch.setattr(fused_module, "BACKWARD_LOOP_STAGES", 1)
    assert fused_module._loop_stages(64, 1, 3, 2) == 1


@pytest.mark.parametrize("kernel", [fused_rms_norm, fused_rms_norm_with_residual])
def test_cpu_tensors_without_the_interpreter_are_refused(kernel, monkeypatch):
    """(model.kernel_backend=fused on a CPU run): a message naming the way out, not Triton's driver error."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors \\(or TRITON_INTERPRET=1\\)"):
        kernel(torch.zeros(2, 8), torch.ones(8))
