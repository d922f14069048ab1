"""The ops' PyTorch paths: the sparse mask, the references and the dispatch."""
import random

import pytest
import torch
from ratplus_kernels import chunked_gated_recurrence, naive_dilated_attention, naive_gated_recurrence, sparse_mask

from megatron_ratplus.attention_pattern import SparsePattern
from megatron_ratplus.ops import gated_recurrence, ratplus_attention


def brute_force_allowed(T, D, W, P):
    out = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        for j in range(T):
            if j > t:
                continue
            local = t - j <= W
            initial = j < P
            chunk_end = D > 0 and (j + 1) % D == 0
            out[t, j] = local or initial or chunk_end
    return out


def test_sparse_mask_brute_force_random_patterns():
    rng = random.Random(0)
    for _ in range(60):
        T = rng.randint(1, 40)
        D = rng.choice([-1, 1, 2, 3, 4, 5, 8, 16, 64])
        W = rng.randint(0, 45)
        P = rng.randint(0, 45)
        mask = sparse_mask(T, D, W, P)
        assert torch.equal(mask, brute_force_allowed(T, D, W, P)), (T, D, W, P)
        assert mask.diagonal().all(), "a query must always see itself"


def test_sparse_mask_examples():
    m = sparse_mask(9, 4, 0, 1)
    # query 7 sees: initial 0, chunk end 3, chunk end 7 (itself)
    assert m[7].nonzero().flatten().tolist() == [0, 3, 7]
    assert sparse_mask(6, 1, 0, 0).equal(torch.ones(6, 6, dtype=torch.bool).tril())   # D=1: dense
    assert sparse_mask(6, -1, 1, 0)[5].nonzero().flatten().tolist() == [4, 5]           # local only


@pytest.mark.parametrize("bad", [(0, 0, 0), (-2, 0, 0), (4, -1, 0), (4, 0, -3)])
def test_bad_patterns_rejected(bad):
    with pytest.raises(ValueError):
        SparsePattern(*bad).validate()
    with pytest.raises(ValueError):
        sparse_mask(8, *bad)


@pytest.mark.parametrize("T", [1, 7, 64, 100])
def test_chunked_recurrence_equals_loop(T):
    g, k, v = (torch.randn(T, 2, 3, 8, dtype=torch.float64) * 4 for _ in range(3))
    init = (torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64))
    a = naive_gated_recurrence(g, k, v, init, True)
    b = chunked_gated_recurrence(g, k, v, init, True, chunk_size=16)
    for x, y in zip(a[:2] + a[2], b[:2] + b[2]):
        torch.testing.assert_close(x, y)


def test_recurrence_dispatch_on_cpu_uses_reference_and_handles_views():
    fused = torch.randn(20, 2, 3, 5, 8)
    g, k, v = fused[:, :, :, 4], fused[:, :, :, 2], fused[:, :, :, 3]
    ko, vo, _ = gated_recurrence(g, k, v)
    kr, vr, _ = naive_gated_recurrence(g, k, v)
    torch.testing.assert_close(ko, kr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vo, vr, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        gated_recurrence(g, k, v, backend="magic")


@pytest.mark.parametrize("pattern", [None, SparsePattern(4, 0, 0), SparsePattern(8, 3, 2), SparsePattern(-1, 2, 1)])
def test_attention_dispatch_matches_masked_reference(pattern):
    q, k, v = (torch.randn(19, 2, 3, 16, dtype=torch.float64) for _ in range(3))
    out = ratplus_attention(q, k, v, pattern)
    want = naive_dilated_attention(q, k, v, *(1, 0, 0) if pattern is None else
                                   (pattern.dilation, pattern.window, pattern.initial))
    torch.testing.assert_close(out, want)
    assert out.is_contiguous()


@pytest.mark.parametrize("with_state", [False, True])
def test_cpu_scan_matches_loop_forward_and_gradients(with_state):
    from ratplus_kernels.recurrence import scan_gated_recurrence
    T, B, H, D = 23, 2, 3, 4
    f64 = dict(dtype=torch.float64, requires_grad=True)
    g, k, v = (torch.randn(T, B, H, D, **f64) for _ in range(3))
    init = (torch.randn(B, H, D, **f64), torch.randn(B, H, D, **f64)) if with_state else None
    weights = [torch.randn(T, B, H, D, dtype=torch.float64) for _ in range(2)] + \
        [torch.randn(B, H, D, dtype=torch.float64) for _ in range(2)]
    inputs = [g, k, v] + (list(init) if init else [])
    results = []
    for fn in (naive_gated_recurrence, scan_gated_recurrence):
        ko, vo, (kT, vT) = fn(g, k, v, init, True)
        loss = sum((o * w).sum() for o, w in zip((ko, vo, kT, vT), weights))
        results.append([ko, vo, kT, vT, *torch.autograd.grad(loss, inputs)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    torch.autograd.gradcheck(lambda g, k, v: scan_gated_recurrence(g, k, v)[:2],
                             (g[:5, :1, :1].detach().requires_grad_(), k[:5, :1, :1].detach().requires_grad_(),
                              v[:5, :1, :1].detach().requires_grad_()))


def test_fused_dispatch_passes_pattern_and_streams_in_order():
    """``backend="fused"`` (the Triton kernels; the interpreter on CPU) against the masked-dense
    reference and the loop: a pattern with W != P and distinct k / v streams, so a dispatch that
    swapped W and P, or k and v, gives other numbers. (The model tests with fused kernels compare
    fused with fused, and the multi-process one uses W == P.)"""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(24, 1, 1, 8, dtype=torch.float32, generator=gen) for _ in range(3))
    pattern = SparsePattern(5, 3, 1)
    want = naive_dilated_attention(q.double(), k.double(), v.double(), 5, 3, 1, scale=0.3)
    got = ratplus_attention(q, k, v, pattern, scale=0.3, backend="fused")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)

    g = torch.randn(24, 1, 1, 8, generator=gen)
    ko, vo, (kT, vT) = gated_recurrence(g, k, v, output_final_state=True, backend="fused")
    kr, vr, (kTr, vTr) = naive_gated_recurrence(g, k, v, output_final_state=True)
    for a, b in ((ko, kr), (vo, vr), (kT, kTr), (vT, vTr)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_recurrence_keeps_an_fp32_state_for_bf16_inputs():
    """DESIGN.md §1: the recurrence runs in fp32 and only its outputs are cast to bf16. With gates near 1
    the per-step change ``(1 - a)(k - h)`` is below a bf16 state's resolution, so a bf16 state stalls;
    every CPU implementation must stay within bf16 output rounding of an fp64 loop."""
    gen = torch.Generator().manual_seed(0)
    T = 100
    g = (4.6 + 0.1 * torch.randn(T, 1, 1, 8, generator=gen)).bfloat16()      # a = sigmoid(g) ~ 0.99
    k, v = (torch.randn(T, 1, 1, 8, generator=gen).bfloat16() for _ in range(2))
    a = torch.sigmoid(g.double())
    hk = hv = torch.zeros(1, 1, 8, dtype=torch.float64)
    ks, vs = [], []
    for t in range(T):
        hk = a[t] * hk + (1 - a[t]) * k[t].double()
        hv = a[t] * hv + (1 - a[t]) * v[t].double()
        ks.append(hk)
        vs.append(hv)
    want_k, want_v = torch.stack(ks), torch.stack(vs)
    for fn in (gated_recurrence, naive_gated_recurrence, chunked_gated_recurrence):
        ko, vo, _ = fn(g, k, v)
        assert ko.dtype == vo.dtype == torch.bfloat16
        torch.testing.assert_close(ko.double(), want_k, rtol=8e-3, atol=1e-3, msg=lambda m: f"{fn.__name__}: {m}")
        torch.testing.assert_close(vo.double(), want_v, rtol=8e-3, atol=1e-3, msg=lambda m: f"{fn.__name__}: {m}")
