"""Dense attention through the flash-attn package where installed (faked here: no GPU, no package)."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import megatron_ratplus.ops.attention as attention_mod
import megatron_ratplus.ops.flash_attn as flash_mod
from megatron_ratplus.ops import dense_causal_attention, ratplus_attention
from megatron_ratplus.ops.flash_attn import FlashAttention, installed_flash_attention


def _fake_flash_attn_func(calls, returns_lse=False, deterministic_kwarg=True):
    """A flash_attn_func with the package's contract: [B, T, H, Dh] in and out."""
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, deterministic=False):
        assert q.dim() == 4 and q.shape == k.shape == v.shape
        calls.append(dict(shape=tuple(q.shape), causal=causal, scale=softmax_scale,
                          deterministic=deterministic))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale).transpose(1, 2)
        return (out, None) if returns_lse else out

    if deterministic_kwarg:
        return flash_attn_func

    def without_deterministic(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal)
    return without_deterministic


@pytest.fixture
def fresh_lookup(monkeypatch):
    monkeypatch.setattr(flash_mod, "_loaded", flash_mod._UNSET)
    yield
    flash_mod._loaded = flash_mod._UNSET


def _module(name, func):
    m = types.ModuleType(name)
    m.flash_attn_func = func
    return m


@pytest.mark.parametrize("present,expected", [(("flash_attn_interface", "flash_attn"), "FlashAttention-3"),
                                              (("flash_attn",), "FlashAttention-2"), ((), None)])
def test_lookup_prefers_flash_attention_3(monkeypatch, fresh_lookup, present, expected):
    for name in ("flash_attn_interface", "flash_attn"):
        # a None entry in sys.modules makes the import fail: the package is "not installed"
        monkeypatch.setitem(sys.modules, name, _module(name, lambda *a, **k: None) if name in present else None)
    found = installed_flash_attention()
    assert (found.name if found else None) == expected
    assert installed_flash_attention() is found                     # looked up once


def test_environment_switch_keeps_sdpa(monkeypatch, fresh_lookup):
    monkeypatch.setitem(sys.modules, "flash_attn", _module("flash_attn", lambda *a, **k: None))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    monkeypatch.setenv("RATPLUS_FLASH_ATTN", "0")
    assert installed_flash_attention() is None


@pytest.mark.parametrize("returns_lse", [False, True])
@pytest.mark.parametrize("deterministic_kwarg", [True, False])
def test_time_first_layout_and_gradients(returns_lse, deterministic_kwarg):
    """[T, B, H, Dh] views of a fused projection go in transposed (no copy) and come back as a
    contiguous [T, B, H, Dh] equal to SDPA's, with gradients."""
    T, B, H, Dh = 37, 2, 3, 16
    calls = []
    flash = FlashAttention(_fake_flash_attn_func(calls, returns_lse, deterministic_kwarg), "fake")
    proj = torch.randn(T, B, H, 3, Dh, dtype=torch.float64, requires_grad=True)
    q, k, v = proj.unbind(3)
    out = flash(q, k, v, 0.3)
    ref = dense_causal_attention(q, k, v, 0.3, backend="reference")
    assert out.shape == (T, B, H, Dh) and out.is_contiguous()
    torch.testing.assert_close(out, ref)
    (g,) = torch.autograd.grad(out.square().sum(), proj)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), proj)
    torch.testing.assert_close(g, g_ref)
    assert calls[0]["shape"] == (B, T, H, Dh) and calls[0]["causal"] and calls[0]["scale"] == 0.3
    assert calls[0]["deterministic"] is False                       # default, or not accepted
    if deterministic_kwarg:
        torch.use_deterministic_algorithms(True)
        try:
            flash(q, k, v, None)
        finally:
            torch.use_deterministic_algorithms(False)
        assert calls[-1]["deterministic"] is True


def test_dense_attention_dispatch(monkeypatch):
    """Where an implementation is installed and applies, dense calls (and D = 1 patterns) take it;
    backend="reference" and sparse patterns do not."""
    calls = []
    flash = FlashAttention(_fake_flash_attn_func(calls), "fake")
    monkeypatch.setattr(attention_mod, "installed_flash_attention", lambda: flash)
    monkeypatch.setattr(FlashAttention, "applies", staticmethod(lambda q: True))
    from megatron_ratplus.attention_pattern import SparsePattern
    q, k, v = torch.randn(3, 16, 2, 2, 8).unbind(0)
    ratplus_attention(q, k, v, None)
    ratplus_attention(q, k, v, SparsePattern(1, 0, 0))
    assert len(calls) == 2
    ratplus_attention(q, k, v, None, backend="reference")
    ratplus_attention(q, k, v, SparsePattern(4, 2, 1))
    assert len(calls) == 2
    with pytest.raises(ValueError, match="backend must be one of"):
        dense_causal_attention(q, k, v, backend="flash")


def test_applies_only_to_cuda_16bit_supported_head_sizes():
    def fake(device_cuda=True, dtype=torch.bfloat16, dh=128, unit=True):
        return types.SimpleNamespace(is_cuda=device_cuda, dtype=dtype, shape=(8, 1, 2, dh),
                                     stride=lambda dim: 1 if unit else 2)
    assert FlashAttention.applies(fake())
    assert FlashAttention.applies(fake(dtype=torch.float16, dh=64))
    assert not FlashAttention.applies(fake(device_cuda=False))
    assert not FlashAttention.applies(fake(dtype=torch.float32))
    assert not FlashAttention.applies(fake(dh=100))
    assert not FlashAttention.applies(fake(dh=512))
    assert not FlashAttention.applies(fake(unit=False))
    assert not FlashAttention.applies(torch.randn(4, 1, 1, 8, dtype=torch.bfloat16))   # CPU
