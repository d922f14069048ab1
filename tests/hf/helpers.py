"""Small models for the Hugging Face tests."""
import torch

from megatron_ratplus.hf import RATPlusConfig, RATPlusForCausalLM

SMALL = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=48, initializer_range=0.25)


def small_config(**overrides) -> RATPlusConfig:
    return RATPlusConfig(**{**SMALL, **overrides})


def small_model(seed=0, dtype=torch.float32, **overrides) -> RATPlusForCausalLM:
    """A random model whose norm weights are perturbed (so a skipped norm is visible)."""
    torch.manual_seed(seed)
    model = RATPlusForCausalLM(small_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype).eval()


def tokens(batch, length, vocab=SMALL["vocab_size"], seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
