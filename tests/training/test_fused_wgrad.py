"""Weight-gradient accumulation fused into the GEMM without apex (training/fused_wgrad.py): the
functions match the unfused sum, and a training step with the fusion on leaves the same fp32
gradient buffers as with it off, each weight's gradient added once."""
import pytest
import torch
from megatron.core.tensor_parallel import layers

from megatron_ratplus.training import fused_wgrad
from megatron_ratplus.training.config import ConfigError, load_config
from megatron_ratplus.training.setup import build_training_objects, use_gradient_accumulation_fusion
from megatron_ratplus.training.step import forward_backward

VOCAB = 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulates_the_weight_gradient_into_main_grad(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 24, generator=gen).to(dtype)
    dy = torch.randn(40, 16, generator=gen).to(dtype)
    main_grad = torch.randn(16, 24, generator=gen)
    expected = main_grad + dy.float().t() @ x.float()
    fused_wgrad.wgrad_gemm_accum_fp32(x, dy, main_grad)
    torch.testing.assert_close(main_grad, expected, rtol=1e-5, atol=1e-5)

    low = torch.zeros(16, 24, dtype=torch.bfloat16)
    fused_wgrad.wgrad_gemm_accum_fp16(x, dy, low)
    torch.testing.assert_close(low.float(), dy.float().t() @ x.float(), rtol=2e-2, atol=5e-2)


def test_probe_accepts_a_working_gemm_and_refuses_a_wrong_one(monkeypatch):
    assert fused_wgrad.fused_gemm_works(torch.device("cpu"))
    monkeypatch.setattr(fused_wgrad, "wgrad_gemm_accum_fp32", lambda x, dy, g: g.mul_(2))
    assert not fused_wgrad.fused_gemm_works(torch.device("cpu"))


def build(overrides):
    cfg = load_config(None, ["train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=2",
                             "train.max_steps=2", "train.precision=fp32", "logging.progress=false",
                             "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2",
                             "model.dilation=4", *overrides])
    torch.manual_seed(0)
    return cfg, build_training_objects(cfg, cfg.model.model_args(vocab_size=VOCAB, seq_len=32), 2)


def main_grads(model):
    return {name: p.main_grad.clone() for chunk in model for name, p in chunk.named_parameters()}


def test_training_step_with_fusion_leaves_the_same_gradients(megatron_single_process, restore_megatron_layers,
                                                             monkeypatch):
    batch = [torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))]
    _, plain = build(["train.gradient_accumulation_fusion=false"])
    assert not plain.transformer_config.gradient_accumulation_fusion
    forward_backward(plain.model, batch, seq_len=32)
    expected = main_grads(plain.model)

    calls = []
    original = fused_wgrad.wgrad_gemm_accum_fp32
    monkeypatch.setattr(fused_wgrad.TORCH_WGRAD_EXTENSION, "wgrad_gemm_accum_fp32",
                        lambda *a: (calls.append(a[2].shape), original(*a))[1])
    _, fused = build(["train.gradient_accumulation_fusion=true"])
    assert fused.transformer_config.gradient_accumulation_fusion
    assert layers.fused_weight_gradient_mlp_cuda is fused_wgrad.TORCH_WGRAD_EXTENSION
    forward_backward(fused.model, batch, seq_len=32)
    got = main_grads(fused.model)

    # every linear layer's weight went through the fused GEMM: 2 layers x (W_in, W_out, fc1, fc2) + lm head
    assert len(calls) == 2 * 4 + 1
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_automatic_choice_is_off_in_cpu_mode_and_a_bad_value_is_refused(megatron_single_process):
    cfg = load_config(None, ["train.max_steps=1"])
    assert cfg.train.gradient_accumulation_fusion is None
    assert use_gradient_accumulation_fusion(cfg) is False
    with pytest.raises(ConfigError, match="gradient_accumulation_fusion must be true, false or null"):
        load_config(None, ["train.max_steps=1", "train.gradient_accumulation_fusion=sometimes"])


def test_requested_fusion_that_cannot_work_is_an_error(megatron_single_process, monkeypatch):
    monkeypatch.setattr(fused_wgrad, "available", lambda device: False)
    cfg = load_config(None, ["train.max_steps=1", "train.gradient_accumulation_fusion=true"])
    with pytest.raises(ConfigError, match="fp32-output GEMM"):
        use_gradient_accumulation_fusion(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 2048, 10240), (8192, 8192, 2048), (4096, 2048, 32000)])
def test_gpu_gemm_accumulates_in_fp32_in_place(shape):
    """On CUDA the fp32-output GEMM (bf16 inputs) adds into main_grad in place, at the 1.5B model's
    weight shapes (tokens, in, out), to fp32 precision of the bf16 products."""
    tokens, fan_in, fan_out = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, fan_in, device="cuda", generator=gen).to(torch.bfloat16)
    dy = torch.randn(tokens, fan_out, device="cuda", generator=gen).to(torch.bfloat16)
    main_grad = torch.randn(fan_out, fan_in, device="cuda", generator=gen)
    expected = torch.addmm(main_grad, dy.t().float(), x.float())
    pointer = main_grad.data_ptr()
    assert fused_wgrad.fused_gemm_works(torch.device("cuda"))
    fused_wgrad.wgrad_gemm_accum_fp32(x, dy, main_grad)
    assert main_grad.data_ptr() == pointer
    torch.testing.assert_close(main_grad, expected, rtol=1e-4, atol=2e-2)
