"""AdamW update with a low-precision model copy: the Triton multi-tensor kernel against the torch
reference, and the reference against ``torch.optim.AdamW`` (what Megatron runs without TE/apex).

On CPU the kernel runs under the Triton interpreter (tests/conftest.py) on a few small tensors whose
sizes straddle the kernel's block; the ``gpu`` test uses the 1.5B model's largest shapes and
NaN-poisoned model copies."""
from __future__ import annotations

import pytest
import torch
from ratplus_kernels.optimizer import fused_adamw_update, naive_adamw_update
from ratplus_kernels.optimizer import fused as fused_mod

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _state(sizes, seed, device=DEV, copies=True):
    """Master weights, grads, moments (as after a few steps), step counts and bf16 model copies
    (None for every third tensor: a master weight without a model copy is updated all the same)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = lambda n: torch.randn(n, generator=gen, device=device)  # noqa: E731
    params = [rand(n) for n in sizes]
    grads = [rand(n) for n in sizes]
    exp_avgs = [0.1 * rand(n) for n in sizes]
    exp_avg_sqs = [0.01 * rand(n).square() for n in sizes]
    steps = [torch.tensor(4.0, device=device) for _ in sizes]
    low = [torch.full((n,), float("nan"), dtype=torch.bfloat16, device=device) if copies and i % 3 != 2
           else None for i, n in enumerate(sizes)]
    return [params, grads, exp_avgs, exp_avg_sqs, steps, low]


def _clone(state):
    return [[None if t is None else t.clone() for t in tensors] for tensors in state]


def _assert_same(got, want, rtol=1e-6, atol=1e-7):
    for name, gs, ws in zip(("param", "grad", "exp_avg", "exp_avg_sq", "step", "model copy"), got, want):
        for i, (g, w) in enumerate(zip(gs, ws)):
            if w is None:
                assert g is None
                continue
            tol = dict(rtol=0, atol=0.0079 * w.float().abs().max().item()) if g.dtype == torch.bfloat16 \
                else dict(rtol=rtol, atol=atol)
            assert torch.isfinite(g.float()).all(), f"{name} {i}: unwritten elements"
            torch.testing.assert_close(g.float(), w.float(), **tol, msg=lambda m: f"{name} {i}: {m}")


def test_reference_matches_torch_adamw():
    """The reference is what torch.optim.AdamW does (several steps, moments from zero), and its
    model copies are the master weights rounded to bf16."""
    state = _state([7, 300], seed=0, device="cpu")
    params, grads = state[0], state[1]
    mine = [p.clone() for p in params]
    moments = [torch.zeros_like(p) for p in params]
    squares = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(torch_params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], foreach=False)
    for step in range(3):
        for p, g in zip(torch_params, grads):
            p.grad = g * (step + 1)
        opt.step()
        naive_adamw_update(mine, [g * (step + 1) for g in grads], moments, squares, steps, state[5], **HYPER)
    for p, q, low in zip(mine, torch_params, state[5]):
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)
        if low is not None:
            assert torch.equal(low, p.to(torch.bfloat16))
    assert all(s.item() == 3.0 for s in steps)


@pytest.mark.parametrize("sizes", [[1], [5, fused_mod.BLOCK], [fused_mod.BLOCK + 3, 17, 2 * fused_mod.BLOCK - 1]])
def test_fused_matches_reference(sizes):
    fused, naive = _state(sizes, seed=1), None
    naive = _clone(fused)
    for _ in range(2):    # the second call reuses the cached tables
        fused_adamw_update(*fused, **HYPER)
        naive_adamw_update(*naive, **HYPER)
    _assert_same(fused, naive)


def test_fused_without_any_model_copy_and_fp16_copies():
    sizes = [33, 70]
    plain = _state(sizes, seed=2, copies=False)
    want = _clone(plain)
    fused_adamw_update(*plain, **HYPER)
    naive_adamw_update(*want, **HYPER)
    _assert_same(plain, want)
    half = _state(sizes, seed=3)
    half[5] = [torch.zeros(n, dtype=torch.float16, device=DEV) for n in sizes]
    want = _clone(half)
    fused_adamw_update(*half, **HYPER)
    naive_adamw_update(*want, **HYPER)
    for got, ref in zip(half[5], want[5]):
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-3, atol=1e-3)


def test_grad_scale_is_the_update_of_scaled_gradients():
    """grad_scale (gradient clipping's coefficient, folded into the update): the kernel and the
    reference update as if the gradients had been multiplied by it first, and leave them unchanged."""
    state = _state([fused_mod.BLOCK + 5, 9], seed=8)
    grads_before = [g.clone() for g in state[1]]
    prescaled = _clone(state)
    prescaled[1] = [g * 0.37 for g in prescaled[1]]
    naive = _clone(state)
    fused_adamw_update(*state, **HYPER, grad_scale=0.37)
    naive_adamw_update(*naive, **HYPER, grad_scale=0.37)
    naive_adamw_update(*prescaled, **HYPER)
    prescaled[1] = grads_before          # the gradients the folded updates must have left alone
    _assert_same(naive, prescaled, rtol=0, atol=0)
    _assert_same(state, prescaled)


@pytest.mark.parametrize("update", [fused_adamw_update, naive_adamw_update])
@pytest.mark.parametrize("grad_scale", [0.0, 1.5, float("nan")])
def test_grad_scale_outside_zero_one_is_refused(update, grad_scale):
    with pytest.raises(ValueError, match="grad_scale must lie in"):
        update(*_state([4], seed=9), **HYPER, grad_scale=grad_scale)


def test_tables_follow_moved_tensors():
    """New tensors at other addresses get new tables: the update lands in them, not in the old ones."""
    first = _state([40], seed=4)
    fused_adamw_update(*first, **HYPER)
    second = _state([40], seed=5)
    before = _clone(first)
    want = _clone(second)
    fused_adamw_update(*second, **HYPER)
    naive_adamw_update(*want, **HYPER)
    _assert_same(second, want)
    _assert_same(first, before, rtol=0, atol=0)


@pytest.mark.parametrize("breakage, message", [
    (lambda s: s[1].__setitem__(0, s[1][0][:-1]), "grad 0 has"),
    (lambda s: s[2].__setitem__(0, s[2][0].double()), "exp_avg 0 must be a contiguous fp32"),
    (lambda s: s.__setitem__(5, [torch.zeros(12, device=DEV), None]), "model copy 0 must be a contiguous bf16"),
    (lambda s: s[5].__setitem__(1, torch.zeros(12, dtype=torch.float16, device=DEV)), "mix dtypes"),
    (lambda s: s[4].pop(), "steps"),
    (lambda s: s[4].__setitem__(1, torch.tensor(1.0, device="meta")), "step 1 is on meta"),
])
def test_bad_input_is_named(breakage, message):
    state = _state([12, 12], seed=6)
    breakage(state)
    with pytest.raises(ValueError, match=message):
        fused_adamw_update(*state, **HYPER)


@pytest.mark.gpu
def test_gpu_matches_torch_fused_adamw_at_model_shapes():
    """Shapes of the 1.5B model (projection, FFN, a norm, a vocab-sized embedding slice): the kernel
    against torch's fused AdamW followed by the bf16 copy, over three steps (one of them clipped)."""
    shapes = [(5 * 2048, 2048), (8192, 2048), (2048,), (3000, 2048), (1,)]
    sizes = [torch.Size(s).numel() for s in shapes]
    state = _state(sizes, seed=7, device="cuda")
    params = [torch.nn.Parameter(p.clone()) for p in state[0]]
    opt = torch.optim.AdamW(params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], fused=True)
    for p, m, v, s in zip(params, state[2], state[3], state[4]):
        opt.state[p] = {"step": s.clone(), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    for scale in (1.0, 0.3, 1.0):      # the middle step clips (grad_scale: one product in fp32, as torch's)
        for p, g in zip(params, state[1]):
            p.grad = g * scale
        opt.step()
        fused_adamw_update(*state, **HYPER, grad_scale=scale)
    for i, (p, got, low) in enumerate(zip(params, state[0], state[5])):
        torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")
        torch.testing.assert_close(state[2][i], opt.state[p]["exp_avg"], rtol=1e-5, atol=1e-7)
        if low is not None:    # the GPU converts to bf16 rounding to nearest, as torch does
            assert torch.equal(low, got.to(torch.bfloat16)), f"model copy {i}"
