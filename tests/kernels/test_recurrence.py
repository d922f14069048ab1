"""RAT+ gated recurrence: fused Triton kernel and chunked reference against the literal time loop.

On CPU the fused kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) at small shapes with small fixed blocks, so short sequences span many time
tiles and exercise the look-back carries. Tests marked ``gpu`` use realistic shapes and the
autotuned kernels, with every output allocation poisoned with NaN.
"""
from __future__ import annotations

import pytest
import ratplus_kernels.recurrence.fused as fused_mod
import torch
from ratplus_kernels.recurrence import (
    chunked_gated_recurrence,
    fused_gated_recurrence,
    naive_gated_recurrence,
    scan_gated_recurrence,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten or overflowed elements)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _fused_inputs(T, B, H, D, dtype, device=DEV, gate_shift=2.0, gate_scale=1.0, seed=0):
    """g, k, v as strided views of one fused [T, B, H, 5, D] projection output (Megatron layout)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, B, H, 5, D, generator=gen)
    x[:, :, :, 4] = x[:, :, :, 4] * gate_scale + gate_shift       # gates: mostly long memory
    x[:, :, :, 2:4] += 0.5                                         # nonzero-mean k, v: carries matter
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    g, k, v = x[:, :, :, 4], x[:, :, :, 2], x[:, :, :, 3]
    return x, g, k, v


def _init_state(B, H, D, device=DEV, seed=1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k0 = torch.randn(B, H, D, generator=gen).to(device).requires_grad_(True)
    v0 = torch.randn(B, H, D, generator=gen).to(device).requires_grad_(True)
    return k0, v0


def _outputs(res, final):
    ko, vo, st = res
    return [ko, vo] + (list(st) if final else [])


def _compare(impl, ref, x, init, final, g, k, v, tol_out, tol_grad, seed=2):
    """Run ``impl`` and ``ref`` on the same inputs and upstream gradients; compare everything."""
    out = _outputs(impl(g, k, v, init, final), final)
    ref_out = _outputs(ref(g, k, v, init, final), final)
    assert out[0].dtype == k.dtype and out[1].dtype == v.dtype
    assert out[0].shape == k.shape
    if final:
        assert out[2].dtype == torch.float32 and out[2].shape == k.shape[1:]
    for o, r in zip(out, ref_out):
        assert _rel(o, r) < tol_out
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in out]
    leaves = [x] + (list(init) if init is not None else [])
    got = torch.autograd.grad(out, leaves, grads)
    exp = torch.autograd.grad(ref_out, leaves, grads)
    for a, b in zip(got, exp):
        assert a.dtype == b.dtype
        assert _rel(a, b) < tol_grad
    # the gradient of the two unused fused blocks (q, o) must be exactly zero
    assert got[0][:, :, :, :2].abs().max().item() == 0.0
    return out, got


# ---------------------------------------------------------------------------------------------
# Reference vs reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,chunk", [(1, 4), (37, 8), (64, 16), (20, 64)])
@pytest.mark.parametrize("with_init", [False, True])
def test_chunked_reference_matches_naive(T, chunk, with_init):
    x, g, k, v = _fused_inputs(T, 2, 2, 8, torch.float32, device="cpu", gate_scale=3.0)
    init = _init_state(2, 2, 8, device="cpu") if with_init else None

    def chunked(g, k, v, init, final):
        return chunked_gated_recurrence(g, k, v, init, final, chunk_size=chunk)

    _compare(chunked, naive_gated_recurrence, x, init, True, g, k, v, 2e-6, 2e-5)


# ---------------------------------------------------------------------------------------------
# Fused kernel vs the literal loop (interpreter on CPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "T,with_init,final",
    [
        (37, True, True),    # odd T, 5 forward tiles of 8 (last partial), 3 backward tiles of 16
        (37, False, False),
        (16, False, True),   # multiple of the tile
        (1, True, True),     # single step
        (9, True, False),    # one tile plus one step
    ],
)
def test_fused_fp32(T, with_init, final):
    B, H, D = 1, 2, 16
    x, g, k, v = _fused_inputs(T, B, H, D, torch.float32, gate_scale=2.0)
    init = _init_state(B, H, D) if with_init else None
    _compare(fused_gated_recurrence, naive_gated_recurrence, x, init, final, g, k, v, 1e-5, 1e-5)


def test_fused_bf16_views():
    B, H, D = 1, 2, 16
    x, g, k, v = _fused_inputs(29, B, H, D, torch.bfloat16)
    assert not g.is_contiguous() and g.stride(-1) == 1
    init = _init_state(B, H, D)
    # the reference also rounds its outputs to bf16 once: differences are 1-ulp roundings
    _compare(fused_gated_recurrence, naive_gated_recurrence, x, init, True, g, k, v, 1e-2, 1e-2)


def test_fused_fp16_head_dim_not_multiple_of_block():
    # D = 12 with 8-channel blocks: the second block of each head is partly masked
    x, g, k, v = _fused_inputs(19, 2, 1, 12, torch.float16)
    _compare(fused_gated_recurrence, naive_gated_recurrence, x, None, True, g, k, v, 5e-3, 5e-3)


@pytest.mark.parametrize("depth", [0, 3, 8])
def test_fused_look_back_depths(monkeypatch, depth):
    """depth 0: greedy look-back; depth K: the carry always folds the K - 1 nearest aggregates
    onto the inclusive state K tiles back (chains of aggregates even when programs run in order,
    as in the interpreter). 61 steps = 8 forward tiles, 4 backward tiles."""
    monkeypatch.setattr(fused_mod, "_LOOKBACK_DEPTH", depth)
    B, H, D = 1, 2, 16
    x, g, k, v = _fused_inputs(61, B, H, D, torch.float32, gate_shift=4.0)
    init = _init_state(B, H, D)
    _compare(fused_gated_recurrence, naive_gated_recurrence, x, init, True, g, k, v, 1e-5, 1e-5)


@pytest.mark.parametrize("early", [0, 1, 2])
def test_fused_backward_block_equal_to_forward_block(monkeypatch, early):
    """Also every order of the backward: forward recompute before / after the look-back, and
    after it with its loads issued before it."""
    monkeypatch.setattr(fused_mod, "_INTERPRET_EARLY", early)
    monkeypatch.setitem(fused_mod._INTERPRET_BLOCKS, "fwd", (8, 16, 1))
    monkeypatch.setitem(fused_mod._INTERPRET_BLOCKS, "bwd", (8, 16, 1))
    B, H, D = 1, 2, 16
    x, g, k, v = _fused_inputs(21, B, H, D, torch.float32)
    init = _init_state(B, H, D)
    _compare(fused_gated_recurrence, naive_gated_recurrence, x, init, True, g, k, v, 1e-5, 1e-5)


@pytest.mark.parametrize("D,blocks", [(8, (8, 32, 1)), (12, (16, 16, 1))])
def test_fused_channel_blocks_spanning_heads(monkeypatch, D, blocks):
    """Channel blocks wider than a head (several heads and batch rows per block) or straddling
    head boundaries (D = 12, 16-channel blocks): the flat channel indexing must map every block
    element back to its own (b, h, d)."""
    monkeypatch.setitem(fused_mod._INTERPRET_BLOCKS, "fwd", blocks)
    monkeypatch.setitem(fused_mod._INTERPRET_BLOCKS, "bwd", (16, blocks[1], 1))
    B, H = 2, 3
    x, g, k, v = _fused_inputs(27, B, H, D, torch.float32)
    init = _init_state(B, H, D)
    _compare(fused_gated_recurrence, naive_gated_recurrence, x, init, True, g, k, v, 1e-5, 1e-5)


@pytest.mark.parametrize("designs", [("stream", "stream"), ("stream", "lookback"),
                                     ("lookback", "stream")], ids="-".join)
@pytest.mark.parametrize("T,with_init,final", [(37, True, True), (16, False, False), (1, True, True)])
def test_streaming_design(monkeypatch, designs, T, with_init, final):
    """The streaming kernels (one program per channel block walking T) in either direction, paired
    with the look-back kernels of the other: both forwards leave the same state rows for both
    backwards. Interpreter blocks: streaming 8-step forward tiles, 16-step backward tiles."""
    monkeypatch.setitem(fused_mod._INTERPRET_DESIGN, "fwd", designs[0])
    monkeypatch.setitem(fused_mod._INTERPRET_DESIGN, "bwd", designs[1])
    B, H, D = 1, 2, 16
    x, g, k, v = _fused_inputs(T, B, H, D, torch.float32, gate_scale=2.0)
    init = _init_state(B, H, D) if with_init else None
    _compare(fused_gated_recurrence, naive_gated_recurrence, x, init, final, g, k, v, 1e-5, 1e-5)


def test_streaming_forward_tiles_longer_than_state_rows(monkeypatch):
    """A 32-step streaming forward tile saves a state every 16 steps (two rows per tile, the
    second partial at the end): the 16-step backward tiles must each find theirs. D = 12 with
    8-channel blocks (masked lanes) and bf16 strided views."""
    monkeypatch.setitem(fused_mod._INTERPRET_DESIGN, "fwd", "stream")
    monkeypatch.setitem(fused_mod._INTERPRET_DESIGN, "bwd", "stream")
    monkeypatch.setitem(fused_mod._INTERPRET_STREAM_BLOCKS, "fwd", (32, 8, 1, 3))
    B, H, D = 2, 1, 12
    x, g, k, v = _fused_inputs(61, B, H, D, torch.bfloat16)
    init = _init_state(B, H, D)
    _compare(fused_gated_recurrence, naive_gated_recurrence, x, init, True, g, k, v, 1e-2, 1e-2)


def test_fused_extreme_gates_and_other_strides():
    """a -> 0 and a -> 1 exactly in fp32, and inputs that are transposes / strided on every dim."""
    T, B, H, D = 17, 2, 1, 8
    gen = torch.Generator(device="cpu").manual_seed(3)
    base = torch.randn(B, T, D, H, 2, 3, generator=gen)
    base[..., 0, 0] = torch.where(base[..., 0, 0] > 0, 40.0, -40.0)   # saturated gates
    base = base.to(DEV).requires_grad_(True)
    g = base[..., 0, 0].permute(1, 0, 3, 2)                        # [T, B, H, D], stride_d != 1
    k = base[..., 1, 1].permute(1, 0, 3, 2)
    v = base[..., 0, 2].permute(1, 0, 3, 2)
    assert g.stride(-1) != 1
    out = _outputs(fused_gated_recurrence(g, k, v, None, True), True)
    ref = _outputs(naive_gated_recurrence(g, k, v, None, True), True)
    for o, r in zip(out, ref):
        assert _rel(o, r) < 1e-6
    grads = [torch.ones_like(o) for o in out]
    got = torch.autograd.grad(out, [base], grads)[0]
    exp = torch.autograd.grad(ref, [base], grads)[0]
    assert _rel(got, exp) < 1e-5


def test_fused_empty_and_errors():
    g = torch.zeros(0, 1, 2, 8, device=DEV)
    ko, vo, st = fused_gated_recurrence(g, g, g, None, True)
    assert ko.shape == g.shape and st[0].shape == (1, 2, 8) and st[0].abs().sum() == 0
    with pytest.raises(ValueError):
        fused_gated_recurrence(torch.zeros(3, 1, 2, 8), torch.zeros(3, 1, 2, 4), torch.zeros(3, 1, 2, 8))
    with pytest.raises(ValueError):
        x = torch.zeros(3, 1, 2, 8, device=DEV)
        fused_gated_recurrence(x, x, x, (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))


def _slot_destination(x, blocks=(4, 2, 3)):
    """A gradient destination of the (g, k, v) slots of a NaN-filled buffer laid out like the
    fused projection ``x`` (unwritten elements stay NaN); returns the provider, the buffer and
    the list of its calls."""
    buffer = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    calls = []

    def provide():
        calls.append(1)
        return tuple(buffer[:, :, :, i] for i in blocks)
    return provide, buffer, calls


_IMPLS = {"fused": fused_gated_recurrence, "naive": naive_gated_recurrence,
          "chunked": chunked_gated_recurrence, "scan": scan_gated_recurrence}


_DESTINATION_CASES = ([("fused", d, t) for d in ("lookback", "stream") for t in (torch.float32, torch.bfloat16)]
                      + [(impl, "lookback", torch.float32) for impl in ("naive", "chunked", "scan")])


@pytest.mark.parametrize("impl,design,dtype", _DESTINATION_CASES)
def test_grad_destination_receives_the_gradients(monkeypatch, impl, design, dtype):
    """dg, dk, dv land in the destination's tensors (the fused backward writes them with the
    inputs' strides, the references copy), are returned as the gradients, and equal those of a
    call without destination. ``design``: the fused backward's design."""
    monkeypatch.setitem(fused_mod._INTERPRET_DESIGN, "bwd", design)
    x, g, k, v = _fused_inputs(37, 2, 2, 8, dtype, gate_scale=2.0)
    init = _init_state(2, 2, 8)
    fn = _IMPLS[impl]
    up = [torch.randn(k.shape, generator=torch.Generator().manual_seed(5)).to(DEV, dtype) for _ in range(2)]
    ko, vo, _ = fn(g, k, v, init, False)
    want = torch.autograd.grad([ko, vo], [g, k, v], up)
    provide, buffer, calls = _slot_destination(x)
    ko, vo, _ = fn(g, k, v, init, False, grad_destination=provide)
    got = torch.autograd.grad([ko, vo], [g, k, v], up)
    assert calls == [1]
    for i, (a, b) in zip((4, 2, 3), zip(got, want)):
        slot = buffer[:, :, :, i]
        assert a.data_ptr() == slot.data_ptr() and a.stride() == slot.stride()
        assert _rel(a, b) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.isnan(buffer[:, :, :, :2]).all()       # the other blocks' slots are untouched


def test_grad_destination_declined_or_wrong():
    x, g, k, v = _fused_inputs(9, 1, 2, 8, torch.float32)
    ko, _, _ = fused_gated_recurrence(g, k, v, grad_destination=lambda: None)
    dg, dk = torch.autograd.grad(ko.sum(), [g, k])          # declined: new tensors
    assert dg.is_contiguous() and _rel(dk, torch.autograd.grad(naive_gated_recurrence(g, k, v)[0].sum(), k)[0]) < 1e-6
    contiguous = lambda: tuple(torch.empty(g.shape, device=g.device) for _ in range(3))  # noqa: E731
    ko, _, _ = fused_gated_recurrence(g, k, v, grad_destination=contiguous)
    with pytest.raises(ValueError, match="dg must match its input's shape, dtype, device and strides"):
        torch.autograd.grad(ko.sum(), [g])


def test_exported_from_package():
    import ratplus_kernels

    assert ratplus_kernels.fused_gated_recurrence is fused_gated_recurrence
    assert "fused_gated_recurrence" in ratplus_kernels.recurrence.__all__


# ---------------------------------------------------------------------------------------------
# GPU: realistic shapes, autotuned kernels, NaN-poisoned outputs
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def poisoned_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(fused_mod, "_new_output", nan_empty)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "T,B,H,D,dtype,with_init",
    [
        (4096, 2, 16, 128, torch.bfloat16, False),
        (4096, 2, 16, 128, torch.float32, True),
        (1000, 3, 5, 64, torch.bfloat16, True),      # T not a multiple of any block, odd heads
        (65536, 1, 2, 128, torch.bfloat16, True),    # long sequence, few channels
        (65536, 1, 1, 128, torch.float32, False),
    ],
)
def test_gpu_matches_reference(poisoned_outputs, T, B, H, D, dtype, with_init):
    # gates near 1 (a ~ 0.95..0.9999): the state carries across hundreds of tiles
    x, g, k, v = _fused_inputs(T, B, H, D, dtype, gate_shift=6.0, gate_scale=2.0, seed=T + B)
    init = _init_state(B, H, D) if with_init else None

    def reference(g, k, v, init, final):
        # fp32 chunked reference on the same (already rounded) inputs; exact to fp32 rounding
        return chunked_gated_recurrence(g, k, v, init, final, chunk_size=64)

    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    _compare(fused_gated_recurrence, reference, x, init, True, g, k, v, tol, tol)


_CANDIDATES = ([("fwd", c) for c in fused_mod.forward_candidates()]
               + [("bwd", c) for c in fused_mod.backward_candidates()])


@pytest.mark.gpu
@pytest.mark.parametrize("kind,config", _CANDIDATES, ids=[f"{k}-{c}" for k, c in _CANDIDATES])
def test_gpu_every_autotuning_candidate(poisoned_outputs, monkeypatch, kind, config):
    """Each autotuning candidate of the forward and of the backward, forced (the other direction
    autotuned; the autotuned tests check only the winners' outputs): realistic bf16 shape with an
    odd length, initial and final states."""
    monkeypatch.setitem(fused_mod._FORCE_CONFIG, kind, fused_mod._launch_kwargs(config))
    T, B, H, D = 4001, 2, 16, 128
    x, g, k, v = _fused_inputs(T, B, H, D, torch.bfloat16, gate_shift=6.0, gate_scale=2.0, seed=3)
    init = _init_state(B, H, D)

    def reference(g, k, v, init, final):
        return chunked_gated_recurrence(g, k, v, init, final, chunk_size=64)

    _compare(fused_gated_recurrence, reference, x, init, True, g, k, v, 1e-2, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("force", [None, "stream"])
def test_gpu_grad_destination(poisoned_outputs, monkeypatch, force):
    """The backward writing into the slots of a NaN-filled projection gradient (strided stores),
    autotuned and with a streaming block forced: equal to the contiguous-output backward, every
    slot element written, the other blocks untouched."""
    if force:
        monkeypatch.setitem(fused_mod._FORCE_CONFIG, "bwd",
                            fused_mod._launch_kwargs(fused_mod._streaming.stream_bwd_configs()[0]))
    x, g, k, v = _fused_inputs(4001, 2, 16, 128, torch.bfloat16, gate_shift=6.0, gate_scale=2.0, seed=4)
    up = [torch.randn(k.shape, generator=torch.Generator().manual_seed(6)).to(DEV, k.dtype) for _ in range(2)]
    ko, vo, _ = fused_gated_recurrence(g, k, v)
    want = torch.autograd.grad([ko, vo], [g, k, v], up)
    provide, buffer, calls = _slot_destination(x)
    ko, vo, _ = fused_gated_recurrence(g, k, v, grad_destination=provide)
    got = torch.autograd.grad([ko, vo], [g, k, v], up)
    assert calls == [1]
    for i, a, b in zip((4, 2, 3), got, want):
        assert a.data_ptr() == buffer[:, :, :, i].data_ptr()
        assert _rel(a, b) < 1e-2                   # NaN (an unwritten slot element) fails here
    assert torch.isnan(buffer[:, :, :, :2]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [0, 8])
def test_gpu_long_sequence_look_back_modes(poisoned_outputs, monkeypatch, depth):
    """Few channel blocks and 1000+ time tiles: programs really wait on their predecessors."""
    monkeypatch.setattr(fused_mod, "_LOOKBACK_DEPTH", depth)
    x, g, k, v = _fused_inputs(65536, 1, 2, 128, torch.float32, gate_shift=6.0, gate_scale=2.0, seed=9)
    init = _init_state(1, 2, 128)

    def reference(g, k, v, init, final):
        return chunked_gated_recurrence(g, k, v, init, final, chunk_size=64)

    _compare(fused_gated_recurrence, reference, x, init, True, g, k, v, 1e-4, 1e-4)


def test_default_look_back_follows_torch_determinism(monkeypatch):
    monkeypatch.setattr(fused_mod, "_LOOKBACK_DEPTH", None)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert fused_mod._lookback_depth() > 0
        torch.use_deterministic_algorithms(False)
        assert fused_mod._lookback_depth() == 0
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.gpu
def test_gpu_matches_naive_loop_fp32(poisoned_outputs):
    x, g, k, v = _fused_inputs(777, 2, 3, 128, torch.float32, gate_shift=3.0, gate_scale=3.0)
    init = _init_state(2, 3, 128)
    _compare(fused_gated_recurrence, naive_gated_recurrence, x, init, True, g, k, v, 1e-5, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [8, 0])
def test_gpu_repeatable(poisoned_outputs, monkeypatch, depth):
    """Same inputs three times. Deterministic look-back (depth > 0): bitwise-identical outputs and
    gradients. Greedy look-back: identical up to fp32 rounding of the carries. A race (a read of
    a carry before it was written) would show as a much larger difference."""
    monkeypatch.setattr(fused_mod, "_LOOKBACK_DEPTH", depth)
    x, g, k, v = _fused_inputs(16384, 2, 16, 128, torch.float32, gate_shift=6.0, seed=5)
    res = []
    for _ in range(3):
        ko, vo, st = fused_gated_recurrence(g, k, v, None, True)
        gx = torch.autograd.grad([ko, vo], [x], [ko.detach(), vo.detach()])[0]
        res.append((ko, vo, st[0], st[1], gx))
    for other in res[1:]:
        for a, b in zip(res[0], other):
            if depth > 0:
                assert torch.equal(a, b)
            else:
                assert _rel(a, b) < 1e-6
