"""The RAT+ layer on a GPU through Megatron's TransformerLayer: the fused path (Triton recurrence
and dilated attention, whose backwards and the compiled RoPE / output gate write the projection's
gradient in its slots) against the reference ops (scan recurrence, masked SDPA) on the same
weights and inputs: output and every gradient. Marked ``gpu``: skipped without CUDA."""
import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module

from megatron_ratplus.model import RATPlusModelArgs, to_transformer_config
from megatron_ratplus.model.specs import get_ratplus_layer_local_spec

T, B = 300, 2


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _layer(args, backend, state=None):
    cfg = to_transformer_config(args, params_dtype=torch.bfloat16, bf16=True, kernel_backend=backend)
    layer = build_module(get_ratplus_layer_local_spec(), config=cfg, layer_number=1).cuda()
    if state is not None:
        layer.load_state_dict(state)
    return layer


def _attention_grads(layer, x, freqs, dy):
    params = [p for n, p in layer.named_parameters() if n.startswith(("input_layernorm.", "self_attention."))]
    out = layer._forward_attention(x, attention_mask=None, rotary_pos_emb=freqs)[0]
    return [out] + list(torch.autograd.grad(out, [x] + params, dy))


@pytest.mark.gpu
@pytest.mark.parametrize("recurrence", [True, False], ids=["ratplus", "attention"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_gpu_fused_layer_matches_reference_ops(megatron_single_process, recurrence, mode):
    args = RATPlusModelArgs(num_layers=1, hidden_size=256, num_attention_heads=2, vocab_size=128, max_seq_len=512,
                            recurrence=recurrence, dilation=16, local_window=32, initial_tokens=4, attention_mode=mode)
    torch.manual_seed(0)
    fused = _layer(args, "auto")
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))          # norm weights away from 1: checked too
    reference = _layer(args, "reference", fused.state_dict())
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(T, B, 256, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    dy = torch.randn(T, B, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
    freqs = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=10000.0)(T).cuda()
    got = _attention_grads(fused, x, freqs, dy)
    want = _attention_grads(reference, x, freqs, dy)
    names = ["output", "d input"] + [f"d {n}" for n, _ in fused.named_parameters()
                                     if n.startswith(("input_layernorm.", "self_attention."))]
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 2e-2, (name, _rel(a, b))
