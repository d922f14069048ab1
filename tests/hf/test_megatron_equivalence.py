"""The Megatron RAT+ model (TP=1, CPU, fp32) and the HF model after conversion give the same logits."""
import dataclasses

import pytest
import torch

from megatron_ratplus.hf import RATPlusForCausalLM, hf_config_from_model_args, megatron_to_hf_state_dict
# Imported before the CPU-mode fixture runs: importing Megatron's GPT modules after CPU mode has
# patched torch.cuda trips torch._dynamo's trace rules (jit_fuser at import time).
from megatron_ratplus.model import RATPlusModelArgs, build_gpt_model, set_attention_mode, to_transformer_config

from .helpers import tokens

CASES = {
    "rat-dense": (dict(), None),
    "rat-D4W2P1": (dict(dilation=4, local_window=2, initial_tokens=1), "sparse"),
    "attn-D3": (dict(recurrence=False, dilation=3), "sparse"),
    "rat-local": (dict(dilation=-1, local_window=3, initial_tokens=2), "sparse"),
    "rat-hybrid-swiglu": (dict(dilation=[5, 1], local_window=[1, 0], initial_tokens=[2, 0], ffn_type="swiglu",
                               ffn_hidden_size=48), "sparse"),
    "rat-nogate": (dict(output_gate=False, dilation=4), "sparse"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_and_hf_logits_match(megatron_world, case):
    overrides, mode = CASES[case]
    args = RATPlusModelArgs(num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=61, max_seq_len=64,
                            init_std=0.2, **overrides)
    tcfg = to_transformer_config(args, params_dtype=torch.float32, use_cpu_initialization=True,
                                 kernel_backend="reference")
    torch.manual_seed(0)
    mg = build_gpt_model(args, tcfg, spec="local").eval()
    with torch.no_grad():
        for name, p in mg.named_parameters():
            if "layernorm" in name:
                p.add_(0.2 * torch.randn_like(p))
    if mode:
        set_attention_mode(mg, mode)
    sd = {k: v for k, v in mg.state_dict().items()}
    rows = sd["output_layer.weight"].shape[0]
    assert rows >= 61
    cfg = hf_config_from_model_args(dataclasses.asdict(args), padded_vocab_size=rows)
    cfg.attention_mode = mode or "dense"
    hf = RATPlusForCausalLM(cfg).eval()
    hf.load_state_dict(megatron_to_hf_state_dict(sd, cfg), strict=True)
    ids = tokens(2, 19)
    B, T = ids.shape
    with torch.no_grad():
        want = mg(ids, torch.arange(T).unsqueeze(0).expand(B, -1), None)
        got = hf(ids).logits
    assert want.shape == got.shape
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _megatron_from_hf(sd_hf, cfg):
    from megatron_ratplus.hf import hf_to_megatron_state_dict, model_args_dict_from_hf_config
    from megatron_ratplus.model.config import pad_vocab_size
    args = RATPlusModelArgs(**model_args_dict_from_hf_config(cfg))
    tcfg = to_transformer_config(args, params_dtype=torch.float32, use_cpu_initialization=True,
                                 kernel_backend="reference")
    mg = build_gpt_model(args, tcfg, spec="local")
    sd = hf_to_megatron_state_dict(sd_hf, cfg, padded_vocab_size=pad_vocab_size(args.vocab_size, 1))
    missing, unexpected = mg.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    return mg


def test_llama_import_into_megatron_reproduces_llama_and_trains(megatron_world):
    """Llama (GQA) -> RAT+ HF state dict -> Megatron GPTModel: recurrence off gives Llama's logits;
    recurrence on (calibrated gate) trains, loss falls, in the Megatron model."""
    import transformers

    from megatron_ratplus.hf import llama_to_ratplus
    torch.manual_seed(0)
    lcfg = transformers.LlamaConfig(vocab_size=71, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False)
    llama = transformers.LlamaForCausalLM(lcfg).eval()
    ids = tokens(2, 24, vocab=71)
    B, T = ids.shape
    pos = torch.arange(T).unsqueeze(0).expand(B, -1)
    sd, cfg = llama_to_ratplus(llama.state_dict(), llama.config, recurrence=False)
    mg = _megatron_from_hf(sd, cfg).eval()
    with torch.no_grad():
        torch.testing.assert_close(mg(ids, pos, None)[..., :71], llama(ids).logits, rtol=1e-5, atol=1e-5)

    sd, cfg = llama_to_ratplus(llama.state_dict(), llama.config, recurrence=True,
                               calibration_ids=tokens(4, 24, vocab=71, seed=3))
    mg = _megatron_from_hf(sd, cfg).train()
    labels = torch.roll(ids, -1, dims=1)
    opt = torch.optim.AdamW(mg.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = mg(ids, pos, None, labels=labels).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0] - 0.5, losses
