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
