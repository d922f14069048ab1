"""The residual branch handed from the layer's norms to its bias-dropout-adds (model/residual.py).

The layers run their Triton kernels through the interpreter (``kernel_backend="fused"``, fp32), so
the norms take the path that sums the residual's gradient in their backward; the gradients must
equal those of the same model with the hand-over off (autograd summing them)."""
import pytest
import torch
from ratplus_kernels.rmsnorm import fused as fused_norm

from megatron_ratplus.model import residual as residual_link
from megatron_ratplus.model.norm import RMSNorm

from .test_layer_math import build_small


def _model(megatron_single_process, **config_overrides):
    """Two layers, fp32, the Triton kernels through the interpreter."""
    return build_small(megatron_single_process, dtype=torch.float32, kernel_backend="fused",
                       config_overrides=config_overrides, max_seq_len=32)


def _layer_norms(model):
    """The input and pre-MLP norms of every layer (the final norm has no residual branch)."""
    return [norm for layer in model.decoder.layers for norm in (layer.input_layernorm, layer.pre_mlp_layernorm)]


def _grads(model, tokens, link: bool, monkeypatch):
    linked_backwards = []
    original = fused_norm._backward

    def recording_backward(ctx, dy, dres):
        linked_backwards.append(dres is not None)
        return original(ctx, dy, dres)

    monkeypatch.setattr(fused_norm, "_backward", recording_backward)
    for m in _layer_norms(model):
        m.link_residual = link
    model.zero_grad(set_to_none=True)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    logits = model(tokens, pos, None)
    (logits.float().square().mean()).backward()
    assert residual_link._pending is None                    # every offer was taken
    return {n: p.grad.clone() for n, p in model.named_parameters()}, linked_backwards


def test_linked_residual_gradients_equal_autograd(megatron_single_process, monkeypatch):
    args, model = _model(megatron_single_process)
    linked_by_spec = [m for m in model.modules() if isinstance(m, RMSNorm) and m.link_residual]
    assert linked_by_spec == _layer_norms(model)              # input + pre-MLP norms; not the final norm
    assert len(linked_by_spec) == 2 * args.num_layers
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    linked, seen_linked = _grads(model, tokens, True, monkeypatch)
    plain, seen_plain = _grads(model, tokens, False, monkeypatch)
    assert seen_linked.count(True) == 2 * args.num_layers    # each layer norm summed its residual
    assert not any(seen_plain)
    assert linked.keys() == plain.keys()
    for name in linked:
        torch.testing.assert_close(linked[name], plain[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_full_recompute_keeps_the_gradients(megatron_single_process, monkeypatch):
    """Under full activation recompute the forward runs without grad (no offer) and the recomputed
    forward links the residual inside the checkpoint's backward."""
    args, model = _model(megatron_single_process, recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1)
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    linked, seen = _grads(model, tokens, True, monkeypatch)
    plain, _ = _grads(model, tokens, False, monkeypatch)
    assert seen.count(True) == 2 * args.num_layers
    for name in linked:
        torch.testing.assert_close(linked[name], plain[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_take_returns_the_stand_in_only_for_the_tensor_offered():
    x, other = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    stand_in = x.view_as(x)
    residual_link.offer_residual(x, stand_in)
    assert residual_link.take_residual(other) is other           # not the offered tensor
    assert residual_link.take_residual(x) is x                   # and the slot was emptied
    residual_link.offer_residual(x, stand_in)
    assert residual_link.take_residual(x) is stand_in
    residual_link.offer_residual(x, x)                           # the reference path offers nothing
    assert residual_link._pending is None


@pytest.mark.parametrize("grad", [False, True])
def test_norm_offers_only_while_recording_gradients(megatron_single_process, grad):
    from types import SimpleNamespace

    config = SimpleNamespace(use_cpu_initialization=True, params_dtype=torch.float32, sequence_parallel=False,
                             ratplus_kernel_backend="fused")
    norm = RMSNorm(config, 16, link_residual=True)
    x = torch.randn(2, 16, requires_grad=True)
    with torch.set_grad_enabled(grad):
        norm(x)
    stand_in = residual_link.take_residual(x)
    assert (stand_in is not x) == grad
