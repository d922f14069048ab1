"""RAT+ model math against the literal loop implementation in tests/model/reference_impl.py."""
import pytest
import torch

from megatron_ratplus.model import (RATPlusModelArgs, attention_mode, build_gpt_model, set_attention_mode,
                                    to_transformer_config)

from .reference_impl import reference_logits

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=64, max_seq_len=64)


def build_small(megatron_single_process, dtype=torch.float64, seed=0, kernel_backend="reference",
                config_overrides=None, **overrides):
    args = RATPlusModelArgs(**{**SMALL, **overrides})
    cfg = to_transformer_config(args, params_dtype=dtype, use_cpu_initialization=True,
                                kernel_backend=kernel_backend, **(config_overrides or {}))
    torch.manual_seed(seed)
    model = build_gpt_model(args, cfg, spec="local")
    # Norm weights start at 1: perturb them so the test sees whether each one is applied.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return args, model


def megatron_logits(model, tokens):
    B, T = tokens.shape
    pos = torch.arange(T).unsqueeze(0).expand(B, -1)
    return model(tokens, pos, None)


def ref(model, args, tokens, patterns):
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return reference_logits(sd, tokens, num_layers=args.num_layers, hidden=args.hidden_size,
                            heads=args.num_attention_heads, recurrence=args.recurrence,
                            output_gate=args.output_gate, patterns=patterns, ffn=args.ffn_type)


SPARSE_CASES = [(4, 0, 0), (8, 3, 2), (-1, 2, 1), (3, 1, 0)]


@pytest.mark.parametrize("recurrence", [True, False])
@pytest.mark.parametrize("pattern", [None] + SPARSE_CASES, ids=lambda p: "dense" if p is None else f"D{p[0]}W{p[1]}P{p[2]}")
def test_logits_match_literal_reference(megatron_single_process, recurrence, pattern):
    extra = {} if pattern is None else dict(dilation=pattern[0], local_window=pattern[1],
                                            initial_tokens=pattern[2])
    args, model = build_small(megatron_single_process, recurrence=recurrence, **extra)
    if pattern is not None:
        set_attention_mode(model, "sparse")
    tokens = torch.randint(0, args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    got = megatron_logits(model, tokens)
    want = ref(model, args, tokens, None if pattern is None else [pattern] * args.num_layers)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_hybrid_per_layer_patterns_and_swiglu(megatron_single_process):
    patterns = [(4, 1, 1), (1, 0, 0)]          # layer 1 sparse, layer 2 dense (D=1)
    args, model = build_small(megatron_single_process, dilation=[4, 1], local_window=[1, 0],
                              initial_tokens=[1, 0], ffn_type="swiglu", ffn_hidden_size=48)
    tokens = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    with attention_mode(model, "sparse"):
        got = megatron_logits(model, tokens)
    want = ref(model, args, tokens, patterns)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # And the mode was restored to dense afterwards.
    dense = megatron_logits(model, tokens)
    torch.testing.assert_close(dense, ref(model, args, tokens, None), rtol=1e-6, atol=1e-6)


def test_sparse_differs_from_dense(megatron_single_process):
    """Guards against a mode switch that silently does nothing."""
    args, model = build_small(megatron_single_process, dilation=4)
    tokens = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    dense = megatron_logits(model, tokens)
    with attention_mode(model, "sparse"):
        sparse = megatron_logits(model, tokens)
    assert (dense - sparse).abs().max() > 1e-4
    # The first tokens see all their keys either way (t - j <= ... ) only for t=0.
    torch.testing.assert_close(dense[:, 0], sparse[:, 0])


@pytest.mark.parametrize("pattern", [None, (4, 1, 1)])
def test_gradients_reach_every_parameter_and_match_reference(megatron_single_process, pattern):
    extra = {} if pattern is None else dict(dilation=pattern[0], local_window=pattern[1],
                                            initial_tokens=pattern[2])
    args, model = build_small(megatron_single_process, **extra)
    if pattern is not None:
        set_attention_mode(model, "sparse")
    tokens = torch.randint(0, args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    weights = torch.randn(2, 10, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (megatron_logits(model, tokens) * weights).sum().backward()

    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()
              if not k.endswith("_extra_state")}
    pats = None if pattern is None else [pattern] * args.num_layers
    (reference_logits(params, tokens, num_layers=2, hidden=32, heads=2, recurrence=True,
                      patterns=pats) * weights).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        if "word_embeddings" not in name:
            assert p.grad.abs().max() > 0, f"zero gradient for {name}"
        # Megatron computes RoPE angles in fp32 even for an fp64 model: that sets the floor here.
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    gate_rows = model.decoder.layers[0].self_attention
    assert gate_rows.block_names[-1] == "g"


def test_projection_is_head_interleaved(megatron_single_process):
    """Each head's rows hold all blocks contiguously (what lets TP split whole heads)."""
    args, model = build_small(megatron_single_process)
    attn = model.decoder.layers[0].self_attention
    x = torch.randn(3, 1, 32, dtype=torch.float64)
    proj, _ = attn.linear_in(x)
    parts, _ = attn.split_projection(proj)
    w = attn.linear_in.weight
    nb, dh = attn.num_blocks, attn.head_dim
    for bi, name in enumerate(attn.block_names):
        for h in range(2):
            rows = w[h * nb * dh + bi * dh:h * nb * dh + (bi + 1) * dh]
            torch.testing.assert_close(parts[name][:, :, h], x @ rows.t())


def test_rope_base_and_norm_eps_are_the_configured_ones(megatron_single_process):
    """``model.rope_base`` and ``model.norm_eps`` reach the layers (a Llama-style import uses another
    base; every other test runs at the defaults, where a model that ignored them looks right).
    init_std=0.2: at 0.02 the attention scores are so small that the base moves the logits by ~1e-8."""
    args, model = build_small(megatron_single_process, rope_base=50.0, norm_eps=0.05, init_std=0.2)
    tokens = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    want = reference_logits(sd, tokens, num_layers=args.num_layers, hidden=args.hidden_size,
                            heads=args.num_attention_heads, recurrence=True, eps=0.05, base=50.0)
    torch.testing.assert_close(megatron_logits(model, tokens), want, rtol=1e-5, atol=1e-5)
