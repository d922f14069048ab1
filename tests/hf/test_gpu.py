"""The Hugging Face model on a GPU: fused recurrence and dilated-attention kernels in prefill, the
SDPA decode path (no cuDNN) and the host-side single-token cache insertion, against the CPU model.
Marked ``gpu``: skipped without CUDA."""
import pytest
import torch

from .helpers import small_model, tokens

PATTERNS = {
    "dense": ("dense", {}),
    "D16W32P4": ("sparse", dict(dilation=16, local_window=32, initial_tokens=4)),
    "D64": ("sparse", dict(dilation=64, local_window=0, initial_tokens=0)),
    "local": ("sparse", dict(dilation=-1, local_window=48, initial_tokens=2)),
}
# head_dim 64 (a shape the fused kernels are built for), 300 tokens: several kernel blocks
GPU_DIMS = dict(hidden_size=128, num_attention_heads=2, intermediate_size=192, initializer_range=0.1)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PATTERNS))
def test_gpu_prefill_and_decode_match_cpu(name):
    mode, overrides = PATTERNS[name]
    model = small_model(seed=5, attention_mode=mode, **GPU_DIMS, **overrides)
    ids = tokens(2, 300, seed=6)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits                      # CPU reference path
        gpu = model.to("cuda")
        full = gpu(ids.cuda(), use_cache=False).logits
        cache, pieces, start = gpu.new_cache(), [], 0
        for n in [200] + [1] * 40 + [60]:                              # prefill, decode steps, a chunk
            pieces.append(gpu(ids[:, start:start + n].cuda(), past_key_values=cache).logits)
            start += n
    # fp32 with TF32 tensor-core products in the fused attention kernel: ~1e-3 relative
    assert _rel(full.cpu(), want) < 5e-3
    assert _rel(torch.cat(pieces, 1).cpu(), want) < 5e-3
    assert cache.get_seq_length() == 300
    if mode == "sparse":
        assert cache.num_entries() == cache.expected_entries()
