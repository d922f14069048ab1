"""Megatron <-> HF state-dict conversion, config mapping and the Llama importer."""
import pytest
import torch
import transformers

from megatron_ratplus.hf import (RATPlusForCausalLM, hf_config_from_model_args, hf_to_megatron_state_dict,
                                 llama_to_ratplus, megatron_to_hf_state_dict, model_args_dict_from_hf_config)
from megatron_ratplus.hf.conversion import GATE_INITS

from .helpers import small_config, small_model, tokens

VARIANTS = {
    "rat-gelu": dict(),
    "attn-gelu": dict(recurrence=False),
    "rat-swiglu": dict(hidden_act="silu"),
    "rat-nogate": dict(output_gate=False),
    "attn-nogate-swiglu": dict(recurrence=False, output_gate=False, hidden_act="silu"),
}


def megatron_shapes(cfg, vocab_rows=None):
    d, _, f, V = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, vocab_rows or cfg.vocab_size
    nb = 3 + int(cfg.output_gate) + int(cfg.recurrence)
    shapes = {"embedding.word_embeddings.weight": (V, d), "decoder.final_layernorm.weight": (d,),
              "output_layer.weight": (V, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"decoder.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "self_attention.linear_in.weight": (nb * d, d),
                       p + "self_attention.linear_out.weight": (d, d), p + "pre_mlp_layernorm.weight": (d,),
                       p + "mlp.linear_fc1.weight": ((2 if cfg.ffn_type == "swiglu" else 1) * f, d),
                       p + "mlp.linear_fc2.weight": (d, f)})
    return shapes


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_megatron_hf_megatron_round_trip_is_identical(variant):
    cfg = small_config(**VARIANTS[variant])
    g = torch.Generator().manual_seed(0)
    mg = {k: torch.randn(s, generator=g) for k, s in megatron_shapes(cfg).items()}
    mg["decoder.layers.0.self_attention.linear_in._extra_state"] = torch.zeros(1)   # ignored
    hf = megatron_to_hf_state_dict(mg, cfg)
    RATPlusForCausalLM(cfg).load_state_dict(hf, strict=True)        # names and shapes fit the model
    back = hf_to_megatron_state_dict(hf, cfg)
    assert set(back) == set(mg) - {"decoder.layers.0.self_attention.linear_in._extra_state"}
    for k, v in back.items():
        assert torch.equal(v, mg[k]), k
    hf2 = megatron_to_hf_state_dict(back, cfg)
    assert set(hf2) == set(hf) and all(torch.equal(hf[k], hf2[k]) for k in hf)


def test_linear_in_rows_are_head_interleaved_in_block_order():
    cfg = small_config()                            # 2 heads of 16, blocks (o, q, k, v, g)
    model = small_model()
    hf = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["output_gate_proj", "q_proj", "k_proj", "v_proj", "recurrence_gate_proj"]
    for b, name in enumerate(names):                # mark every row with (block, output channel)
        w = torch.arange(32, dtype=torch.float32)[:, None].expand(32, 32) + 1000 * b
        hf[f"model.layers.1.self_attn.{name}.weight"] = w.clone()
    w_in = hf_to_megatron_state_dict(hf, cfg)["decoder.layers.1.self_attention.linear_in.weight"]
    dh, nb = 16, 5
    for h in range(2):
        for b in range(nb):
            for c in range(dh):
                assert w_in[h * nb * dh + b * dh + c, 0] == 1000 * b + h * dh + c


def test_swiglu_fc1_is_gate_then_up():
    cfg = small_config(hidden_act="silu")
    hf = small_model(hidden_act="silu").state_dict()
    fc1 = hf_to_megatron_state_dict(hf, cfg)["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:48], hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[48:], hf["model.layers.0.mlp.up_proj.weight"])


def test_vocab_padding_rows():
    cfg = small_config()                          # vocab 61
    g = torch.Generator().manual_seed(0)
    mg = {k: torch.randn(s, generator=g) for k, s in megatron_shapes(cfg, vocab_rows=128).items()}
    hf = megatron_to_hf_state_dict(mg, cfg)       # padding rows dropped
    assert hf["lm_head.weight"].shape == (61, 32)
    assert torch.equal(hf["model.embed_tokens.weight"], mg["embedding.word_embeddings.weight"][:61])
    padded = hf_to_megatron_state_dict(hf, cfg, padded_vocab_size=128)
    assert padded["output_layer.weight"].shape == (128, 32) and padded["output_layer.weight"][61:].abs().sum() == 0
    # keeping all rows makes the round trip exact
    args = model_args_dict_from_hf_config(cfg)
    cfg128 = hf_config_from_model_args(args, padded_vocab_size=128)
    back = hf_to_megatron_state_dict(megatron_to_hf_state_dict(mg, cfg128), cfg128)
    assert all(torch.equal(back[k], mg[k]) for k in mg)
    # ... and the config records the real vocabulary, which converting back restores.
    assert cfg128.vocab_size == 128 and cfg128.unpadded_vocab_size == 61
    assert model_args_dict_from_hf_config(cfg128)["vocab_size"] == 61
    assert hf_config_from_model_args(args, padded_vocab_size=61).unpadded_vocab_size is None
    for bad in (0, 129, 61.0, True):
        with pytest.raises(ValueError, match="unpadded_vocab_size"):
            type(cfg)(vocab_size=128, hidden_size=32, num_attention_heads=2, unpadded_vocab_size=bad)
    with pytest.raises(ValueError, match="fewer than vocab_size"):
        megatron_to_hf_state_dict({**mg, "output_layer.weight": torch.zeros(60, 32)}, cfg)


def test_conversion_rejects_unexpected_and_missing_keys():
    cfg = small_config()
    g = torch.Generator().manual_seed(0)
    mg = {k: torch.randn(s, generator=g) for k, s in megatron_shapes(cfg).items()}
    with pytest.raises(ValueError, match="unexpected"):
        megatron_to_hf_state_dict({**mg, "decoder.layers.9.foo.weight": torch.zeros(1)}, cfg)
    del mg["decoder.layers.1.mlp.linear_fc2.weight"]
    with pytest.raises(ValueError, match="missing weight .*linear_fc2"):
        megatron_to_hf_state_dict(mg, cfg)


def test_model_args_round_trip_and_fit_the_megatron_dataclass():
    args = dict(num_layers=3, hidden_size=256, num_attention_heads=2, vocab_size=4096, max_seq_len=512,
                ffn_hidden_size=None, ffn_type="swiglu", recurrence=True, output_gate=True,
                dilation=[16, 1, -1], local_window=[8, 0, 4], initial_tokens=4, attention_mode="sparse",
                rope_base=500000.0, norm_eps=1e-5, init_std=0.01)
    cfg = hf_config_from_model_args(args)
    assert cfg.hidden_act == "silu" and cfg.intermediate_size == 1024 and cfg.rope_theta == 500000.0
    assert cfg.layer_pattern(2) == (-1, 4, 4)
    back = model_args_dict_from_hf_config(cfg)
    assert back == {**args, "ffn_hidden_size": 1024}
    from megatron_ratplus.model import RATPlusModelArgs
    assert RATPlusModelArgs.from_dict(back).ffn_size == 1024


# ------------------------------------------------------------------------------------------------
# Llama import
# ------------------------------------------------------------------------------------------------
def tiny_llama(kv_heads, tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=71, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads,
                                   max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.2,
                                   tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("fold", [True, False], ids=["gate-folded", "no-gate"])
def test_llama_import_without_recurrence_reproduces_logits(kv_heads, fold):
    llama = tiny_llama(kv_heads)
    sd, cfg = llama_to_ratplus(llama.state_dict(), llama.config, recurrence=False, fold_output_gate=fold)
    assert cfg.output_gate == fold and not cfg.recurrence and cfg.ffn_type == "swiglu"
    model = RATPlusForCausalLM(cfg).eval()
    model.load_state_dict(sd, strict=True)
    ids = tokens(2, 24, vocab=71)
    with torch.no_grad():
        want = llama(ids).logits
        got = model(ids).logits
    assert want.abs().max() > 1.0                    # a non-trivial function
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_llama_import_tied_embeddings():
    llama = tiny_llama(2, tie=True)
    ids = tokens(1, 10, vocab=71)
    # a tied checkpoint's weight files hold no lm_head.weight; a state_dict() of the module does
    without_head = {k: v for k, v in llama.state_dict().items() if k != "lm_head.weight"}
    for state_dict in (dict(llama.state_dict()), without_head):
        sd, cfg = llama_to_ratplus(state_dict, llama.config, recurrence=False)
        model = RATPlusForCausalLM(cfg).eval()
        model.load_state_dict(sd, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_llama_special_tokens_and_rope_base_carry_over():
    """The imported config keeps the Llama's end-of-sequence id (generation stops there) and its
    RoPE base, written the transformers 4.x way (rope_theta) or the 5.x way (rope_parameters)."""
    llama = tiny_llama(2)
    conf = llama.config.to_dict()
    conf.update(bos_token_id=5, eos_token_id=7, pad_token_id=None, rope_theta=500000.0)
    conf.pop("rope_parameters", None)
    _, cfg = llama_to_ratplus(llama.state_dict(), conf, recurrence=False)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.rope_theta) == (5, 7, 500000.0)
    conf.pop("rope_theta")
    conf.pop("rope_scaling", None)
    conf["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0}
    _, cfg = llama_to_ratplus(llama.state_dict(), conf, recurrence=False)
    assert cfg.rope_theta == 250000.0


@pytest.mark.parametrize("gate_init", GATE_INITS)
def test_llama_import_with_recurrence_gives_finite_loss_and_trains(gate_init):
    llama = tiny_llama(2)
    ids = tokens(4, 32, vocab=71, seed=7)
    extra = dict(calibration_ids=tokens(4, 32, vocab=71, seed=8)) if gate_init == "calibrated" else {}
    sd, cfg = llama_to_ratplus(llama.state_dict(), llama.config, recurrence=True, gate_init=gate_init, **extra)
    model = RATPlusForCausalLM(cfg)
    model.load_state_dict(sd, strict=True)
    g = sd["model.layers.0.self_attn.recurrence_gate_proj.weight"]
    assert (g.abs().sum() == 0) == (gate_init in ("zeros", "zeros-kv2", "auto"))   # auto w/o text: zeros
    loss0 = model(ids, labels=ids).loss
    assert torch.isfinite(loss0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(ids, labels=ids).loss < loss0 - 0.5


def test_llama_import_refuses_unsupported_configs():
    llama = tiny_llama(2)
    bad = llama.config.to_dict()
    bad["hidden_act"] = "gelu"
    with pytest.raises(ValueError, match="SwiGLU"):
        llama_to_ratplus(llama.state_dict(), bad, recurrence=False)
    bad = llama.config.to_dict()
    bad["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    bad.pop("rope_parameters", None)
    with pytest.raises(ValueError, match="RoPE scaling"):
        llama_to_ratplus(llama.state_dict(), bad, recurrence=False)
    with pytest.raises(ValueError, match="gate_init"):
        llama_to_ratplus(llama.state_dict(), llama.config, recurrence=True, gate_init="ones")
    with pytest.raises(ValueError, match="calibration_ids"):
        llama_to_ratplus(llama.state_dict(), llama.config, recurrence=True, gate_init="calibrated")


def test_llama_import_of_a_non_llama_config_is_a_clear_error():
    """A GPT-2 folder given to from-llama: a ValueError naming what the config lacks (ratplus-convert
    reports ValueErrors as errors), not a TypeError traceback from int(None)."""
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50,
                                                                n_positions=32))
    with pytest.raises(ValueError, match="not a Llama-style config: it has no intermediate_size"):
        llama_to_ratplus(gpt2.state_dict(), gpt2.config, recurrence=False)
    bad = tiny_llama(2).config.to_dict()
    bad.pop("num_hidden_layers")
    with pytest.raises(ValueError, match="it has no num_hidden_layers"):
        llama_to_ratplus(tiny_llama(2).state_dict(), bad, recurrence=False)


def test_llama_import_refuses_a_sliding_window_and_imports_mistral_without_one():
    """A Mistral config with sliding_window set attends only the last window keys: imported as full
    causal attention the logits differ from position `window` on, so the import is refused; without
    a window the Mistral imports exactly like a Llama."""
    torch.manual_seed(0)
    kwargs = dict(vocab_size=71, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2)
    windowed = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=4, **kwargs)).eval()
    with pytest.raises(ValueError, match="sliding_window=4"):
        llama_to_ratplus(windowed.state_dict(), windowed.config, recurrence=False)
    full = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **kwargs)).eval()
    sd, cfg = llama_to_ratplus(full.state_dict(), full.config, recurrence=False)
    model = RATPlusForCausalLM(cfg).eval()
    model.load_state_dict(sd)
    ids = tokens(1, 12, vocab=71)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, full(ids).logits, rtol=1e-5, atol=1e-5)
    qwen_like = dict(full.config.to_dict(), sliding_window=4, use_sliding_window=False)   # window off
    llama_to_ratplus(full.state_dict(), qwen_like, recurrence=False)


def test_calibrated_gate_is_closer_to_llama_than_zeros():
    """The calibrated gate drives a = sigmoid(g) towards sigmoid(-4) on text like the calibration text."""
    llama = tiny_llama(2)
    ids = tokens(4, 40, vocab=71, seed=9)
    with torch.no_grad():
        want = llama(ids).logits
        errs = {}
        for gi in ("zeros", "calibrated"):
            sd, cfg = llama_to_ratplus(llama.state_dict(), llama.config, recurrence=True, gate_init=gi,
                                       calibration_ids=tokens(8, 40, vocab=71, seed=10))
            model = RATPlusForCausalLM(cfg).eval()
            model.load_state_dict(sd)
            errs[gi] = (model(ids).logits - want).abs().mean().item()
    assert errs["calibrated"] < 0.5 * errs["zeros"], errs
    auto, _ = llama_to_ratplus(llama.state_dict(), llama.config, recurrence=True,
                               calibration_ids=tokens(8, 40, vocab=71, seed=10))
    assert torch.equal(auto["model.layers.1.self_attn.recurrence_gate_proj.weight"],
                       sd["model.layers.1.self_attn.recurrence_gate_proj.weight"])
