"""RAT+ dilated attention: fused Triton kernel (forward, backward, lse) and decode kernel.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
with 16-wide blocks, so short sequences span several far, near and diagonal tiles. The reference
is the masked-dense ``naive_dilated_attention`` in float64 on the same (rounded) inputs. Tests
marked ``gpu`` run realistic shapes with every output / gradient allocation prefilled with NaN.
"""
from __future__ import annotations

import pytest
import ratplus_kernels.dilated_attention.backward_kernels as backward_kernels
import ratplus_kernels.dilated_attention.forward_kernels as forward_kernels
import ratplus_kernels.dilated_attention.fused as fused_mod
import ratplus_kernels.dilated_attention.tiles as tiles_mod
import torch
import torch.nn.functional as F
from ratplus_kernels import fused_dilated_attention as top_level_export
from ratplus_kernels.first_use import FirstUseChoice
from ratplus_kernels.dilated_attention import (
    decode_attention,
    fused_dilated_attention,
    naive_dilated_attention,
    sparse_mask,
)
from ratplus_kernels.dilated_attention.decode import sdpa_decode_attention, triton_decode_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten or overflowed elements)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(T, B, H, Dh, dtype, device=DEV, fused_view=False, seed=0):
    """q, k, v ([T, B, H, Dh]) and upstream grads; optionally strided views of one fused
    [T, B, H, 4, Dh] projection output, as Megatron's fused W_in produces."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if fused_view:
        x = torch.randn(T, B, H, 4, Dh, generator=gen).to(device=device, dtype=dtype)
        x.requires_grad_(True)
        leaves = [x]
        q, k, v = x[:, :, :, 1], x[:, :, :, 2], x[:, :, :, 3]
    else:
        q, k, v = (torch.randn(T, B, H, Dh, generator=gen).to(device=device, dtype=dtype)
                   .requires_grad_(True) for _ in range(3))
        leaves = [q, k, v]
    do = torch.randn(T, B, H, Dh, generator=gen).to(device)
    dlse = torch.randn(B, H, T, generator=gen).to(device)
    return leaves, (q, k, v), do, dlse


def _run(fn, qkv, do, dlse, pattern, with_lse):
    """Outputs and input gradients of ``fn`` for loss = <out, do> (+ <lse, dlse>)."""
    out, lse = fn(*qkv, *pattern, return_lse=True)
    loss = (out.double() * do.double()).sum()
    if with_lse:
        loss = loss + (lse.double() * dlse.double()).sum()
    grads = torch.autograd.grad(loss, qkv)
    return out, lse, grads


def _reference(qkv, do, dlse, pattern, with_lse):
    ref_in = [x.detach().double().requires_grad_(True) for x in qkv]
    return _run(naive_dilated_attention, ref_in, do, dlse, pattern, with_lse)


def _check(T, B, H, Dh, pattern, dtype=torch.float32, fused_view=False, with_lse=True,
           tol=(2e-5, 2e-5), seed=0, device=DEV):
    _, qkv, do, dlse = _inputs(T, B, H, Dh, dtype, device, fused_view, seed)
    out, lse, grads = _run(fused_dilated_attention, qkv, do, dlse, pattern, with_lse)
    r_out, r_lse, r_grads = _reference(qkv, do, dlse, pattern, with_lse)
    assert out.dtype == dtype and out.shape == (T, B, H, Dh) and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (B, H, T)
    tol_out, tol_grad = tol
    assert _rel(out, r_out) < tol_out, ("out", _rel(out, r_out))
    assert _rel(lse, r_lse) < tol_out, ("lse", _rel(lse, r_lse))
    for name, g, r in zip("qkv", grads, r_grads):
        assert g.shape == r.shape
        assert _rel(g, r) < tol_grad, ("d" + name, _rel(g, r))


# (T, D, W, P): every regime of the partition into near band / initial / chunk-end keys
CASES = [
    (64, 64, 0, 0),      # training pattern, T = D: a single chunk end
    (80, 16, 0, 0),      # many chunk ends, several gathered tiles
    (75, 16, 20, 4),     # band + initial + chunk ends, odd T
    (70, 8, 33, 4),      # band wider than a block, not block-aligned
    (90, 4, 0, 0),       # many gathered keys (several BG tiles)
    (40, 64, 0, 0),      # T < D: no chunk end at all
    (45, 64, 5, 3),      # T < D with band and initial keys
    (33, 5, 40, 0),      # W >= T: everything is near
    (33, 5, 2, 40),      # P > T: every key is global
    (48, 7, 3, 9),       # P > D: initial keys that are also chunk ends
    (50, 1, 0, 0),       # D = 1: dense causal through the gathered path
    (37, 1, 10, 2),      # D = 1 with a band
    (53, -1, 6, 2),      # local-only
    (40, -1, 0, 0),      # local-only, W = 0: attention to itself
    (17, 16, 1, 1),      # T = D + 1
    (1, 16, 256, 4),     # T = 1
    (31, 16, 256, 4),    # adaptation preset, T < W
]


@pytest.mark.parametrize("T,D,W,P", CASES)
def test_fused_matches_reference_fp32(T, D, W, P):
    _check(T, 1, 2, 16, (D, W, P))


@pytest.mark.parametrize("T,D,W,P,Dh", [(70, 16, 20, 4, 32), (66, 8, 0, 0, 64), (45, 6, 7, 2, 24)])
def test_fused_head_dims(T, D, W, P, Dh):
    _check(T, 1, 1, Dh, (D, W, P))


@pytest.mark.parametrize("T,D,W,P", [(72, 16, 20, 4), (50, 64, 0, 0), (41, 3, 0, 2)])
def test_fused_strided_views(T, D, W, P):
    """q, k, v as interleaved views of one fused projection, batch and heads > 1."""
    _check(T, 2, 3, 16, (D, W, P), fused_view=True)


def test_fused_grads_flow_into_fused_projection():
    leaves, qkv, do, _ = _inputs(40, 2, 2, 16, torch.float32, fused_view=True)
    out = fused_dilated_attention(*qkv, 8, 3, 1)
    out.backward(do)
    x = leaves[0]
    ref_x = x.detach().clone().requires_grad_(True)
    ref = naive_dilated_attention(ref_x[:, :, :, 1], ref_x[:, :, :, 2], ref_x[:, :, :, 3], 8, 3, 1)
    ref.backward(do)
    assert _rel(x.grad, ref_x.grad) < 2e-5
    assert torch.count_nonzero(x.grad[:, :, :, 0]) == 0       # the unused slot gets no gradient


@pytest.mark.parametrize("T,D,W,P", [(75, 16, 20, 4), (64, 64, 0, 0), (45, 1, 0, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_precision(T, D, W, P, dtype):
    _check(T, 1, 2, 32, (D, W, P), dtype=dtype, tol=(1e-2, 2e-2))


def test_fused_without_lse_gradient_and_scale():
    _, qkv, do, _ = _inputs(60, 1, 2, 16, torch.float32, seed=3)
    out = fused_dilated_attention(*qkv, 16, 8, 2, scale=0.3)
    assert isinstance(out, torch.Tensor)
    grads = torch.autograd.grad(out, qkv, do)
    ref_in = [x.detach().double().requires_grad_(True) for x in qkv]
    ref = naive_dilated_attention(*ref_in, 16, 8, 2, scale=0.3)
    r_grads = torch.autograd.grad(ref, ref_in, do.double())
    assert _rel(out, ref) < 2e-5
    for g, r in zip(grads, r_grads):
        assert _rel(g, r) < 2e-5


def test_fused_lse_only_gradient():
    _, qkv, _, dlse = _inputs(50, 1, 1, 16, torch.float32, seed=4)
    _, lse = fused_dilated_attention(*qkv, 8, 4, 1, return_lse=True)
    grads = torch.autograd.grad((lse * dlse).sum(), qkv)
    ref_in = [x.detach().double().requires_grad_(True) for x in qkv]
    _, r_lse = naive_dilated_attention(*ref_in, 8, 4, 1, return_lse=True)
    r_dq, r_dk = torch.autograd.grad((r_lse * dlse.double()).sum(), ref_in[:2])
    assert _rel(grads[0], r_dq) < 2e-5
    assert _rel(grads[1], r_dk) < 2e-5
    assert torch.count_nonzero(grads[2]) == 0                 # lse does not depend on v


@pytest.mark.parametrize("fwd,bwd", [
    (dict(BM=32, BN=16, BG=16),
     dict(dq=dict(BLK=32, BN1=16, BG=32), dkdv=dict(BLK=16, BM2=32), far=dict(BG=16, BM2=32))),
    (dict(BM=16, BN=32, BG=32),
     dict(dq=dict(BLK=16, BN1=32, BG=16), dkdv=dict(BLK=32, BM2=16), far=dict(BG=32, BM2=16))),
])
def test_fused_other_block_shapes(fwd, bwd):
    """Forward query block != key tile; the three backward kernels with different tilings
    (and so different far-pass query segments)."""
    extra = dict(num_warps=4, num_stages=1)
    bwd = {name: dict(c, **extra) for name, c in bwd.items()}
    with fused_mod.block_config(fwd=dict(fwd, **extra), bwd=bwd):
        for T, D, W, P in [(83, 16, 20, 4), (70, 4, 0, 1), (47, -1, 37, 0), (40, 1, 3, 2)]:
            _check(T, 1, 1, 16, (D, W, P), seed=T)


_SPLIT_BWD = dict(dq=dict(BLK=16, BN1=16, BG=16), dkdv=dict(BLK=16, BM2=16), far=dict(BG=16, BM2=16))


@pytest.mark.parametrize("T,D,P", [(80, 16, 0), (90, 4, 0), (70, 4, 1), (48, 7, 9), (33, 5, 40),
                                   (50, 1, 0), (40, -1, 0), (64, 64, 0), (17, 16, 0)])
@pytest.mark.parametrize("path", ["single_pass", "single_pass_fold", "split"])
def test_fused_w0_backward_paths(T, D, P, path):
    """W = 0 has two backwards: the single pass (global keys held per query segment, delta from
    the scores; optionally with the global rows' diagonal folded into the key-major products)
    and the split three-kernel one. Both against the reference, with the lse gradient, several
    query segments (interpreter: 2 blocks each) and several heads."""
    extra = dict(num_warps=4, num_stages=1)
    bwd = {name: dict(c, **extra) for name, c in _SPLIT_BWD.items()}
    single = path.startswith("single_pass")
    bwd["w0"] = dict(BLK=16, NGC_MAX=64, FOLD_DIAG=path.endswith("fold"), **extra) if single else None
    bwd["w0_tma"] = None
    fused_mod._LAST_KERNELS.clear()
    with fused_mod.block_config(fwd=dict(BM=16, BN=16, BG=16, **extra), bwd=bwd):
        _check(T, 2, 2, 16, (D, 0, P), seed=T + P)
    used = {"bwd_w0"} if single else {"bwd_dq"}
    assert used <= set(fused_mod._LAST_KERNELS), sorted(fused_mod._LAST_KERNELS)


@pytest.mark.parametrize("T,D,P,fused_view", [(80, 16, 0, False), (70, 4, 1, True), (33, 5, 40, False),
                                              (64, 64, 0, True), (17, 16, 0, False)])
@pytest.mark.parametrize("variant", [{}, dict(TMA_STORE=True, DQ_T=True, FOLD_DIAG=True)])
def test_fused_w0_tma_single_pass(T, D, P, fused_view, variant):
    """The single pass reading q, k, v, do as TMA tiles of ``[T, columns]`` views (bf16, as on
    the GPU), against the reference: rows past T read as zeros, several query segments, views of
    a fused projection (column offsets b * stride_b + h * stride_h inside a wider row); also
    storing dq, dk, dv as TMA tiles (rows past T dropped; folded diagonal, which TMA_STORE
    needs) with dq as a transposed product."""
    extra = dict(num_warps=4, num_stages=1)
    bwd = {name: dict(c, **extra) for name, c in _SPLIT_BWD.items()}
    w0 = dict(BLK=16, NGC_MAX=64, LOOP_STAGES=1, FOLD_DIAG=T % 2 == 0, **extra)
    bwd.update(w0=None, w0_tma=dict(w0, **variant))
    fused_mod._LAST_KERNELS.clear()
    with fused_mod.block_config(fwd=dict(BM=16, BN=16, BG=16, **extra), bwd=bwd):
        _check(T, 2, 2, 16, (D, 0, P), dtype=torch.bfloat16, fused_view=fused_view,
               tol=(1e-2, 2e-2), seed=T + P)
    assert "bwd_w0" in fused_mod._LAST_KERNELS


def test_fused_w0_tma_stores_need_the_folded_diagonal():
    """TMA stores write whole row tiles, global rows included, which only the folded diagonal
    rewrites afterwards: asking for them without it is a clear error, not a wrong gradient."""
    extra = dict(num_warps=4, num_stages=1)
    bwd = {name: dict(c, **extra) for name, c in _SPLIT_BWD.items()}
    bwd.update(w0=None, w0_tma=dict(BLK=16, NGC_MAX=64, FOLD_DIAG=False, TMA_STORE=True, **extra))
    q, k, v = (torch.randn(32, 1, 1, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with fused_mod.block_config(fwd=dict(BM=16, BN=16, BG=16, **extra), bwd=bwd):
        out = fused_mod.fused_dilated_attention(q, k, v, 16, 0, 0)
        with pytest.raises(ValueError, match="TMA_STORE needs FOLD_DIAG"):
            out.sum().backward()


@pytest.mark.parametrize("T,D,P", [(80, 16, 0), (70, 4, 1), (33, 5, 40), (64, 64, 0), (17, 16, 0),
                                   (40, 64, 0), (50, 1, 0)])
@pytest.mark.parametrize("tiles", ["pointer", "tma", "device", "tma_store"])
def test_fused_w0_single_pass_forward(monkeypatch, T, D, P, tiles):
    """The single-pass W = 0 forward (global keys loaded once per query segment, exact softmax
    per row) against the reference: fp32 with pointer loads, bf16 on TMA tiles made on the host
    or in the kernel (views of a fused projection, rows past T read as zeros), several segments;
    o also stored as TMA tiles (rows past T dropped)."""
    extra = dict(num_warps=4, num_stages=1)
    w0 = dict(BLK=16, NGC_MAX=64, LOOP_STAGES=1, **extra)
    if tiles != "pointer":
        w0["TMA"] = "device" if tiles == "device" else True
        w0["TMA_STORE"] = tiles == "tma_store"
    made = []
    if tiles == "device":
        _record_device_tiles(monkeypatch, made)
    bwd = dict({name: dict(c, **extra) for name, c in _SPLIT_BWD.items()}, w0=None, w0_tma=None)
    fused_mod._LAST_KERNELS.clear()
    with fused_mod.block_config(fwd=dict(BM=16, BN=16, BG=16, w0=w0, **extra), bwd=bwd):
        if tiles == "pointer":
            _check(T, 2, 2, 16, (D, 0, P), seed=T + P)
        else:
            _check(T, 2, 2, 16, (D, 0, P), dtype=torch.bfloat16, fused_view=True, tol=(1e-2, 2e-2),
                   seed=T + P)
    assert "fwd_w0" in fused_mod._LAST_KERNELS and "fwd" not in fused_mod._LAST_KERNELS
    assert (tiles == "device") == bool(made)


def test_fused_w0_forward_choice(monkeypatch):
    """Without a timer "auto" runs the per-block forward; a forced mode runs its kernel where the
    single pass applies (W = 0, few global keys), the per-block forward elsewhere."""
    choice = FirstUseChoice("W=0 forward")
    monkeypatch.setattr(fused_mod, "W0_FORWARD", choice)
    w0 = dict(BLK=16, NGC_MAX=32, num_warps=4, num_stages=1)
    monkeypatch.setattr(fused_mod, "_fwd_config",
                        lambda dh, dtype: dict(BM=16, BN=16, BG=16, num_warps=4, num_stages=1, w0=w0))
    for mode, pattern, T, expected in [("auto", (16, 0, 0), 80, "fwd"),
                                       ("single_pass", (16, 0, 0), 80, "fwd_w0"),
                                       ("blocks", (16, 0, 0), 80, "fwd"),
                                       ("single_pass", (16, 3, 0), 80, "fwd"),     # W > 0
                                       ("single_pass", (2, 0, 0), 90, "fwd")]:     # 45 keys > 32
        choice.mode = mode
        fused_mod._LAST_KERNELS.clear()
        _check(T, 1, 2, 16, pattern, seed=7)
        other = "fwd_w0" if expected == "fwd" else "fwd"
        assert expected in fused_mod._LAST_KERNELS and other not in fused_mod._LAST_KERNELS, (mode, pattern)
        assert not choice.choices


@pytest.mark.parametrize("T,D,W,P,fused_view", [(83, 16, 20, 4, True), (70, 4, 0, 1, False),
                                                (47, -1, 37, 0, True), (40, 1, 3, 2, False),
                                                (33, 5, 40, 0, False)])
@pytest.mark.parametrize("mode", [True, "device"])
def test_fused_tma_tiles_every_kernel(monkeypatch, T, D, W, P, fused_view, mode):
    """Forward, dq, band dk/dv and far dk/dv kernels reading their contiguous row tiles through
    TMA descriptors (bf16, the split backward), made on the host (counted per box height) or in
    the kernel, against the reference."""
    made = []
    real = fused_mod._row_tile_descriptor
    monkeypatch.setattr(fused_mod, "_row_tile_descriptor", lambda x, rows: made.append(rows) or real(x, rows))
    if mode == "device":
        _record_device_tiles(monkeypatch, made)
    extra = dict(num_warps=4, num_stages=1, TMA=mode)
    bwd = {name: dict(c, **extra) for name, c in _SPLIT_BWD.items()}
    bwd.update(w0=None, w0_tma=None)
    with fused_mod.block_config(fwd=dict(BM=32, BN=16, BG=16, **extra), bwd=bwd):
        _check(T, 2, 2, 16, (D, W, P), dtype=torch.bfloat16, fused_view=fused_view,
               tol=(1e-2, 2e-2), seed=T + W)
    if mode == "device":
        assert made and all(m == "device" for m in made)
        return
    # forward: q (32 rows), k and v (16-row band tiles, or 32-row diagonal when W = 0); dq: 5
    assert made[:3] == [32, 16, 16] if W else made[:3] == [32, 32, 32]
    assert len(made) >= 3 + 5


@pytest.mark.parametrize("T,uses_tma", [(75, True), (63, False)])
def test_fused_far_kernel_tma_from_length(monkeypatch, T, uses_tma):
    """``TMA_FROM_T`` of the far kernel's configuration (the default sets it for long sequences):
    from that length on the far dk/dv kernel reads q and do as TMA tiles, below it by pointers;
    the other kernels keep their own setting, and the gradients are right either way."""
    made = []
    real = fused_mod._row_tile_descriptor
    monkeypatch.setattr(fused_mod, "_row_tile_descriptor", lambda x, rows: made.append(rows) or real(x, rows))
    extra = dict(num_warps=4, num_stages=1)
    bwd = {name: dict(c, **extra) for name, c in _SPLIT_BWD.items()}
    bwd["far"].update(BM2=32, TMA_FROM_T=64)
    bwd.update(w0=None, w0_tma=None)
    with fused_mod.block_config(fwd=dict(BM=16, BN=16, BG=16, **extra), bwd=bwd):
        _check(T, 2, 2, 16, (16, 20, 4), dtype=torch.bfloat16, tol=(1e-2, 2e-2), seed=T)
    assert made == ([32, 32] if uses_tma else [])       # q and do boxes of BM2 rows, far kernel only
    assert "TMA_FROM_T" in bwd["far"]                    # the caller's configuration is not consumed


def _record_device_tiles(monkeypatch, made):
    """Every use of the in-kernel descriptor helper by the (interpreted) forward and backward
    kernels leaves a trace in ``made``."""
    recorder = _Recorder(tiles_mod._device_tile, made)
    for kernels in (forward_kernels, backward_kernels):
        monkeypatch.setattr(kernels, "_device_tile", recorder)


class _Recorder:
    """Wraps a @triton.jit helper so that interpreted kernels calling it leave a trace."""

    def __init__(self, jit_fn, made):
        self.jit_fn, self.made = jit_fn, made

    def __call__(self, *args, **kwargs):
        self.made.append("device")
        return self.jit_fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.jit_fn, name)


def test_row_tiles_ok_rejects_what_tma_cannot_read():
    x = torch.zeros(8, 2, 3, 16, dtype=torch.bfloat16)
    assert fused_mod._row_tiles_ok([x], 16)
    assert fused_mod._row_tile_columns(x) == 2 * 3 * 16
    wide = torch.zeros(8, 2, 3, 48, dtype=torch.bfloat16)[..., 16:32]       # fused-projection view
    assert fused_mod._row_tiles_ok([wide], 16) and fused_mod._row_tile_columns(wide) == 5 * 48 + 16
    assert not fused_mod._row_tiles_ok([x.float()], 16)                       # 32-bit
    assert not fused_mod._row_tiles_ok([torch.zeros(8, 2, 3, 24, dtype=torch.bfloat16)], 16)  # Dh
    odd = torch.zeros(8 * 2 * 3 * 16 + 1, dtype=torch.bfloat16)[1:].view(8, 2, 3, 16)
    assert not fused_mod._row_tiles_ok([odd], 16)                             # base not 16-B aligned
    assert not fused_mod._row_tiles_ok([x.transpose(0, 1)], 16)               # rows overlap


@pytest.fixture
def w0_auto(monkeypatch):
    """"auto" selection with a fake timer: records which backward was timed, returns set times."""
    timed, times = [], {}

    def fake_time(fn):
        timed.append(fn.__name__)
        fn()                                                   # runs the candidate once
        if isinstance(times.get(fn.__name__), Exception):
            raise times[fn.__name__]
        return times[fn.__name__]

    choice = FirstUseChoice("W=0 backward", timer=fake_time, can_time=lambda: True)
    monkeypatch.setattr(fused_mod, "W0_BACKWARD", choice)
    return timed, times, choice


@pytest.mark.parametrize("fastest", ["split", "split_dq_w0", "single_pass"])
def test_fused_w0_auto_selection_times_once_per_shape(w0_auto, fastest):
    timed, times, choice = w0_auto
    times.update(split=2.0, split_dq_w0=2.5, single_pass=3.0)
    times[fastest] = 1.0
    _check(80, 1, 2, 16, (16, 0, 0), seed=1)                   # times all, runs the fastest
    assert timed == ["split", "split_dq_w0", "single_pass"]
    fused_mod._LAST_KERNELS.clear()
    _check(80, 1, 2, 16, (16, 0, 0), seed=1)                   # reuses the choice
    assert ("bwd_w0" in fused_mod._LAST_KERNELS) == (fastest == "single_pass")
    assert ("bwd_dq" in fused_mod._LAST_KERNELS) != (fastest == "single_pass")
    assert list(choice.choices.values()) == [fastest]
    _check(96, 1, 2, 16, (16, 0, 0), seed=2)                   # same length bucket (<= 128)
    assert len(timed) == 3
    _check(200, 1, 2, 16, (16, 0, 0), seed=2)                  # a new bucket is timed again
    assert len(timed) == 6
    _check(150, 1, 1, 16, (2, 0, 0), seed=2)                   # 75 global keys: no single pass
    assert timed[6:] == ["split", "split_dq_w0"]


def test_fused_w0_auto_skips_a_failing_candidate(w0_auto):
    timed, times, choice = w0_auto
    times.update(split=2.0, split_dq_w0=3.0, single_pass=RuntimeError("out of resources: shared memory"))
    with pytest.warns(RuntimeWarning, match="'single_pass' failed"):
        _check(80, 1, 2, 16, (16, 0, 0), seed=3)
    assert list(choice.choices.values()) == ["split"]
    fused_mod._LAST_KERNELS.clear()
    _check(80, 1, 2, 16, (16, 0, 0), seed=4)                   # no second attempt
    assert len(timed) == 3 and "bwd_dq" in fused_mod._LAST_KERNELS


def test_fused_w0_modes(monkeypatch):
    """Without a timer (here: the CPU) "auto" runs the split backward and caches nothing; a
    forced mode runs its backward where it applies; W > 0 never uses the single pass."""
    choice = FirstUseChoice("W=0 backward")
    monkeypatch.setattr(fused_mod, "W0_BACKWARD", choice)
    for mode, expected in [("auto", "bwd_dq"), ("single_pass", "bwd_w0"), ("split", "bwd_dq"),
                           ("split_dq_w0", "bwd_dq")]:
        choice.mode = mode
        fused_mod._LAST_KERNELS.clear()
        _check(80, 1, 2, 16, (16, 0, 0), seed=5)
        assert expected in fused_mod._LAST_KERNELS and not choice.choices
    choice.mode = "single_pass"
    fused_mod._LAST_KERNELS.clear()
    _check(80, 1, 2, 16, (16, 3, 0), seed=6)
    assert "bwd_w0" not in fused_mod._LAST_KERNELS


def test_fused_w0_single_pass_needs_few_global_keys():
    """More global keys than the tile holds: the split backward runs (and is right)."""
    extra = dict(num_warps=4, num_stages=1)
    bwd = {name: dict(c, **extra) for name, c in _SPLIT_BWD.items()}
    bwd["w0"] = dict(BLK=16, NGC_MAX=32, **extra)
    fused_mod._LAST_KERNELS.clear()
    with fused_mod.block_config(fwd=dict(BM=16, BN=16, BG=16, **extra), bwd=bwd):
        _check(90, 1, 2, 16, (2, 0, 0), seed=5)                # 45 global keys > 32
    assert "bwd_dq" in fused_mod._LAST_KERNELS and "bwd_w0" not in fused_mod._LAST_KERNELS


def test_fused_partition_counts_each_pair_once():
    """With v = one-hot key ids, the output is the attention matrix itself: compare it with the
    allowed mask (each allowed key weighted once, no key outside the mask)."""
    T, D, W, P = 70, 8, 12, 3
    q = torch.zeros(T, 1, 1, 128, device=DEV)                 # uniform attention weights
    k = torch.randn(T, 1, 1, 128, device=DEV)
    v = torch.eye(T, 128, device=DEV).reshape(T, 1, 1, 128)
    out = fused_dilated_attention(q, k, v, D, W, P)[:, 0, 0, :T]
    mask = sparse_mask(T, D, W, P, device=DEV).float()
    expected = mask / mask.sum(1, keepdim=True)
    assert torch.allclose(out, expected, atol=1e-6)


def test_fused_rejects_bad_inputs():
    q = torch.randn(8, 1, 1, 16, device=DEV)
    with pytest.raises(ValueError):
        fused_dilated_attention(q, q, q, 0, 0, 0)
    with pytest.raises(ValueError):
        fused_dilated_attention(q, q, q, 4, -1, 0)
    with pytest.raises(ValueError):
        fused_dilated_attention(q, q[:4], q, 4, 0, 0)
    with pytest.raises(TypeError):
        fused_dilated_attention(q, q.double(), q, 4, 0, 0)


def test_top_level_export():
    assert top_level_export is fused_dilated_attention


# ------------------------------------------------------------------------------------------------
# decode
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,H,N,Dh,splits", [(2, 3, 37, 32, None), (1, 2, 5, 16, None),
                                            (2, 2, 100, 24, 1), (1, 1, 70, 16, 5), (1, 2, 1, 16, None)])
def test_triton_decode_matches_sdpa(B, H, N, Dh, splits):
    gen = torch.Generator(device="cpu").manual_seed(N)
    q = torch.randn(B, H, Dh, generator=gen).to(DEV)
    kbuf = torch.randn(B, H, N + 9, Dh, generator=gen).to(DEV)        # cache = view of a buffer
    vbuf = torch.randn(B, H, N + 9, Dh, generator=gen).to(DEV)
    kc, vc = kbuf[:, :, 4:N + 4], vbuf[:, :, :N]
    ref = sdpa_decode_attention(q.double(), kc.double(), vc.double())
    got = triton_decode_attention(q, kc, vc, num_splits=splits)
    assert got.shape == (B, H, Dh) and got.dtype == q.dtype
    assert _rel(got, ref) < 1e-5
    got_bf = triton_decode_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), scale=0.2,
                                     num_splits=splits)
    ref_bf = sdpa_decode_attention(q.bfloat16().double(), kc.bfloat16().double(),
                                   vc.bfloat16().double(), scale=0.2)
    assert got_bf.dtype == torch.bfloat16 and _rel(got_bf, ref_bf) < 1e-2


@pytest.mark.parametrize("entry", [decode_attention, triton_decode_attention], ids=["sdpa", "triton"])
def test_decode_shapes_that_do_not_fit_are_refused(entry):
    """A cache of another batch, head count or head size would be read out of bounds by the kernel."""
    q = torch.zeros(2, 2, 16, device=DEV)
    for k, message in [(torch.zeros(1, 2, 5, 16), "does not match q"), (torch.zeros(2, 2, 5, 8), "does not match q"),
                       (torch.zeros(2, 2, 0, 16), "the KV cache is empty"), (torch.zeros(2, 5, 16), "expected q")]:
        with pytest.raises(ValueError, match=message):
            entry(q, k.to(DEV), k.to(DEV))
    if entry is triton_decode_attention:
        with pytest.raises(ValueError, match="num_splits must be >= 1"):
            entry(q, torch.zeros(2, 2, 5, 16, device=DEV), torch.zeros(2, 2, 5, 16, device=DEV), num_splits=0)


def test_decode_matches_last_row_of_sparse_attention():
    """The compact cache (P initial + last W+1 + chunk ends) reproduces the sparse attention of
    the newest token."""
    T, D, W, P, Dh = 70, 8, 5, 3, 16
    gen = torch.Generator(device="cpu").manual_seed(7)
    q, k, v = (torch.randn(T, 1, 2, Dh, generator=gen).to(DEV) for _ in range(3))
    full = naive_dilated_attention(q, k, v, D, W, P)[-1]                     # [B, H, Dh]
    keep = sparse_mask(T, D, W, P, device=DEV)[-1].nonzero().squeeze(1)
    kc = k[keep].permute(1, 2, 0, 3)
    vc = v[keep].permute(1, 2, 0, 3)
    assert _rel(decode_attention(q[-1], kc, vc), full) < 1e-5
    assert _rel(triton_decode_attention(q[-1], kc, vc), full) < 1e-5


# ------------------------------------------------------------------------------------------------
# GPU: realistic shapes, poisoned allocations
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def poisoned(monkeypatch):
    def _nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(fused_mod, "_new_output", _nan_output)


@pytest.mark.gpu
@pytest.mark.parametrize("T,B,pattern", [(4096, 2, (64, 0, 0)), (4096, 2, (16, 256, 4)), (4096, 2, (16, 0, 0)),
                                         (8192, 1, (16, 256, 4)), (8192, 1, (64, 0, 0))])
def test_gpu_realistic_bf16(poisoned, T, B, pattern):
    """The default kernels at the anchor's length and at a long one (where the far kernel switches
    to TMA tiles, ``TMA_FROM_T``)."""
    H, Dh = 16, 128
    _, qkv, do, dlse = _inputs(T, B, H, Dh, torch.bfloat16, fused_view=True, seed=11)
    out, lse, grads = _run(fused_dilated_attention, qkv, do, dlse, pattern, True)
    ref_in = [x.detach().float().requires_grad_(True) for x in qkv]        # fp32 reference
    r_out, r_lse, r_grads = _run(naive_dilated_attention, ref_in, do, dlse, pattern, True)
    assert _rel(out, r_out) < 1e-2
    assert _rel(lse, r_lse) < 1e-3
    for g, r in zip(grads, r_grads):
        assert _rel(g, r) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("T,D,W,P,Dh", [(4096, 16, 256, 4, 128), (4096, 64, 0, 0, 128),
                                        (1000, 16, 100, 4, 64), (777, 4, 0, 1, 128)])
@pytest.mark.parametrize("mode", [True, "device"])
def test_gpu_tma_tiles_every_kernel(poisoned, monkeypatch, T, D, W, P, Dh, mode):
    """Forward, dq, band and far dk/dv kernels on TMA row tiles (the split backward), on views of
    a fused projection, at realistic and odd shapes; descriptors encoded on the host or built in
    the kernels (then no host descriptor is made)."""
    made = []
    real = fused_mod._row_tile_descriptor
    monkeypatch.setattr(fused_mod, "_row_tile_descriptor", lambda x, rows: made.append(rows) or real(x, rows))
    tma = dict(TMA=mode)
    bwd = fused_mod._bwd_config(Dh, torch.bfloat16)
    bwd = dict({n: dict(bwd[n], **tma) for n in ("dq", "dkdv", "far")}, w0=None, w0_tma=None)
    fwd = dict(BM=64, BN=32, BG=32, num_warps=4, num_stages=3, **tma)
    with fused_mod.block_config(fwd=fwd, bwd=bwd):
        _check(T, 2, 4, Dh, (D, W, P), dtype=torch.bfloat16, fused_view=True, tol=(1e-2, 2e-2), seed=T)
    if mode == "device":
        assert made == []
    else:
        assert len(made) >= 3 + 5 + 2                # forward, dq kernel, far (and band) kernels


@pytest.mark.gpu
@pytest.mark.parametrize("T,D,W,P,Dh", [(1000, 64, 0, 0, 64), (777, 16, 100, 4, 128),
                                        (300, 1, 0, 0, 128), (513, -1, 200, 4, 64), (100, 256, 3, 300, 32)])
def test_gpu_odd_shapes(poisoned, T, D, W, P, Dh):
    _check(T, 2, 4, Dh, (D, W, P), dtype=torch.bfloat16, fused_view=True, tol=(1e-2, 2e-2), seed=T)
    _check(T, 1, 2, Dh, (D, W, P), dtype=torch.float32, tol=(1e-5, 1e-5), seed=T + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("T,D,P,Dh", [(4096, 64, 0, 128), (1000, 64, 0, 64), (777, 16, 3, 128)])
@pytest.mark.parametrize("tma", [False, True, "device", "store"])
@pytest.mark.parametrize("warps", [4, 8])
def test_gpu_w0_single_pass(poisoned, T, D, P, Dh, tma, warps):
    """The single-pass W = 0 backward (whether or not it is the default) at realistic shapes,
    with pointer loads and with pipelined TMA tiles (host or in-kernel descriptors), in one
    warpgroup (the default: 16-row blocks) and in two (32-row blocks, unfolded diagonal with
    pointer loads)."""
    w0 = dict(BLK=16 if warps == 4 else 32, NGC_MAX=64, num_warps=warps, num_stages=1, PROGS_PER_SM=4,
              FOLD_DIAG=warps == 4)
    tma = dict(TMA=True, TMA_STORE=True, DQ_T=warps == 4) if tma == "store" else dict(TMA=tma)
    tiles = (dict(w0=None, w0_tma=dict(w0, LOOP_STAGES=3, FOLD_DIAG=True, **tma)) if tma["TMA"]
             else dict(w0=w0, w0_tma=None))
    bwd = dict(fused_mod._bwd_config(Dh, torch.bfloat16), **tiles)
    fused_mod._LAST_KERNELS.clear()
    with fused_mod.block_config(bwd=bwd):
        _check(T, 2, 4, Dh, (D, 0, P), dtype=torch.bfloat16, fused_view=True, tol=(1e-2, 2e-2), seed=T)
    assert "bwd_w0" in fused_mod._LAST_KERNELS


@pytest.mark.gpu
@pytest.mark.parametrize("T,D,P,Dh", [(4096, 64, 0, 128), (1000, 64, 0, 64), (777, 16, 3, 128)])
@pytest.mark.parametrize("tma", [False, True, "device", "store"])
def test_gpu_w0_single_pass_forward(poisoned, T, D, P, Dh, tma):
    """The single-pass W = 0 forward (whether or not the first-use choice keeps it) at realistic
    and odd shapes, pointer loads or pipelined TMA tiles (host or in-kernel descriptors), and o
    stored as TMA tiles."""
    w0 = dict(fused_mod._FWD_W0_CONFIG, TMA=bool(tma) if tma == "store" else tma, TMA_STORE=tma == "store")
    fwd = dict(BM=64, BN=32, BG=32, num_warps=4, num_stages=3, w0=w0)
    fused_mod._LAST_KERNELS.clear()
    with fused_mod.block_config(fwd=fwd, bwd=fused_mod._bwd_config(Dh, torch.bfloat16)):
        _check(T, 2, 4, Dh, (D, 0, P), dtype=torch.bfloat16, fused_view=True, tol=(1e-2, 2e-2), seed=T)
    assert "fwd_w0" in fused_mod._LAST_KERNELS


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4, 16])
@pytest.mark.parametrize("T", [4096, 65536])
def test_gpu_decode(B, T):
    H, Dh = 16, 128
    N = 4 + 257 + T // 16
    q = torch.randn(B, H, Dh, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(B, H, N + 32, Dh, device="cuda", dtype=torch.bfloat16)[:, :, :N]
    vc = torch.randn(B, H, N + 32, Dh, device="cuda", dtype=torch.bfloat16)[:, :, :N]
    ref = F.scaled_dot_product_attention(q.float()[:, :, None], kc.float(), vc.float()).squeeze(2)
    assert _rel(decode_attention(q, kc, vc), ref) < 1e-2
    assert _rel(triton_decode_attention(q, kc, vc), ref) < 1e-2
