"""RoPE and the output gate (ops/elementwise.py): forward and hand-written backward against
autograd of the plain formulas, with and without gradient destinations (slots of a buffer)."""
import pytest
import torch

from megatron_ratplus.ops.elementwise import output_gate, rope_qk

S, B, H, D = 7, 2, 3, 8


def _ref_rope(x, freqs):
    x1, x2 = x.chunk(2, dim=-1)
    return x * torch.cos(freqs) + torch.cat((-x2, x1), dim=-1) * torch.sin(freqs)


def _blocks(device="cpu", dtype=torch.float64, seed=0):
    """q, k, o as slot views of a fused [S, B, H, 3, D] buffer, like the projection's blocks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S, B, H, 3, D, generator=gen).to(device, dtype).requires_grad_()
    return x, x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]


def _freqs(device="cpu", general=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if general:       # halves not equal: the transposed rotation must not assume cat(f, f)
        return torch.randn(S, 1, 1, D, generator=gen, dtype=torch.float64).to(device)
    f = torch.randn(S, 1, 1, D // 2, generator=gen, dtype=torch.float64)
    return torch.cat((f, f), dim=-1).to(device)


def _rel(a, b):
    """Norm-wise relative error (bf16 results against fp64 formulas)."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _slots(x, index):
    """A destination handing out slot ``index`` of a NaN buffer shaped like ``x``; returns it and
    the buffer."""
    buffer = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    return (lambda: (buffer[:, :, :, index],)), buffer


def _matches_formula(out, want_out, inputs, up):
    """Outputs equal the formula's; returns (got, want) gradients w.r.t. ``inputs``, checked equal."""
    want = torch.autograd.grad(want_out, inputs, up)
    torch.testing.assert_close(out, want_out)
    got = torch.autograd.grad(out, inputs, up)
    torch.testing.assert_close(got, want)
    return got


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.parametrize("with_destinations", [False, True])
def test_rope_matches_formula_and_autograd(general, with_destinations):
    x, q, k, _ = _blocks()
    freqs = _freqs(general=general)
    up = [torch.randn(S, B, H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in (2, 3)]
    dq_dest, dq_buffer = _slots(x, 0) if with_destinations else (None, None)
    dk_dest, dk_buffer = _slots(x, 1) if with_destinations else (None, None)
    got = _matches_formula(rope_qk(q, k, freqs, dq_dest, dk_dest), (_ref_rope(q, freqs), _ref_rope(k, freqs)),
                           (q, k), up)
    if with_destinations:
        assert got[0].data_ptr() == dq_buffer[:, :, :, 0].data_ptr()
        assert got[1].data_ptr() == dk_buffer[:, :, :, 1].data_ptr()


@pytest.mark.parametrize("with_destination", [False, True])
def test_output_gate_matches_autograd(with_destination):
    x, attn_src, _, o = _blocks()
    attn = attn_src * 1.5
    up = torch.randn(S, B, H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    dest, buffer = _slots(x, 2) if with_destination else (None, None)
    got = _matches_formula(output_gate(attn, o, dest), attn * torch.sigmoid(o), (attn, o), up)
    if with_destination:
        assert got[1].data_ptr() == buffer[:, :, :, 2].data_ptr()


def test_declined_and_mismatched_destinations():
    x, q, k, o = _blocks()
    freqs = _freqs()
    out = rope_qk(q, k, freqs, lambda: None)
    dq = torch.autograd.grad(out[0].sum(), q)[0]                       # declined: a new tensor
    torch.testing.assert_close(dq, torch.autograd.grad(_ref_rope(q, freqs).sum(), q)[0])
    out = output_gate(q, o, lambda: (torch.empty(S, B, H, D + 1, dtype=torch.float64),))
    with pytest.raises(ValueError, match="gradient destination"):
        torch.autograd.grad(out.sum(), o)


@pytest.mark.gpu
def test_gpu_compiled_kernels_write_slots():
    """On CUDA the forward/backward run compiled (bf16); slots written in place, values as the
    fp64 formulas."""
    x, q, k, o = _blocks(device="cuda", dtype=torch.bfloat16)
    freqs = _freqs(device="cuda").float()
    dq_dest, buffer = _slots(x, 0)
    qr, kr = rope_qk(q, k, freqs, dq_dest)
    up = torch.randn_like(qr)
    dq, dk = torch.autograd.grad((qr, kr), (q, k), (up, up))
    assert dq.data_ptr() == buffer[:, :, :, 0].data_ptr() and not torch.isnan(dq).any()
    want = torch.autograd.grad(_ref_rope(q.double(), freqs.double()), q, up.double())[0]
    assert _rel(dq, want) < 1e-2
    gate_dest, gbuf = _slots(x, 2)
    out = output_gate(kr, o, gate_dest)
    do = torch.autograd.grad(out, o, up)[0]
    assert do.data_ptr() == gbuf[:, :, :, 2].data_ptr() and not torch.isnan(do).any()
    s = torch.sigmoid(o.double())
    assert _rel(do, up.double() * kr.double() * s * (1 - s)) < 1e-2


def test_rope_tables_are_computed_once_per_angles_tensor():
    """The cos/sin tables are cached by the angles tensor (Megatron reuses one per sequence length):
    the same tensors come back, per dtype; an in-place change or a new tensor gets new tables; a
    dropped angles tensor drops its tables."""
    import gc

    from megatron_ratplus.ops.elementwise import _TABLES, rope_tables

    freqs = _freqs().float()
    cos, sin = rope_tables(freqs, torch.float32)
    torch.testing.assert_close(cos, torch.cos(freqs))
    torch.testing.assert_close(sin, torch.sin(freqs))
    again = rope_tables(freqs, torch.float32)
    assert again[0] is cos and again[1] is sin
    half = rope_tables(freqs, torch.bfloat16)
    assert half[0].dtype == torch.bfloat16 and half[0] is not cos
    torch.testing.assert_close(half[0], torch.cos(freqs).bfloat16())

    freqs.mul_(2.0)                                   # in place: the cached tables are stale
    cos2, _ = rope_tables(freqs, torch.float32)
    assert cos2 is not cos
    torch.testing.assert_close(cos2, torch.cos(freqs))
    other = freqs.clone()
    assert rope_tables(other, torch.float32)[0] is not cos2

    entries = len(_TABLES)
    del other
    gc.collect()
    assert len(_TABLES) == entries - 1 and any(f is freqs for f in _TABLES.keys())


def test_rope_reuses_the_tables_across_layers():
    """Two layers' calls with one angles tensor compute the tables once (one cos, one sin)."""
    x, q, k, _ = _blocks()
    freqs = _freqs()
    calls = []
    real_cos = torch.cos

    def counting_cos(t, *args, **kwargs):
        calls.append(t.shape)
        return real_cos(t, *args, **kwargs)

    torch.cos = counting_cos
    try:
        for _ in range(3):
            rope_qk(q, k, freqs)
    finally:
        torch.cos = real_cos
    assert calls == [freqs.shape]


def test_rope_under_inference_mode_is_computed_and_not_cached():
    """Inference tensors have no version counter: their tables are computed per call, not cached."""
    from megatron_ratplus.ops.elementwise import _TABLES

    _, q, k, _ = _blocks()
    with torch.inference_mode():
        freqs = _freqs()
        before = len(_TABLES)
        out = rope_qk(q.detach(), k.detach(), freqs)
        torch.testing.assert_close(out[0], _ref_rope(q.detach(), freqs))
        assert len(_TABLES) == before
