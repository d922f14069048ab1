"""Fixtures shared by the training tests."""
import pytest
from megatron.core.tensor_parallel import layers


@pytest.fixture
def restore_megatron_layers(monkeypatch):
    """fused_wgrad.install() edits Megatron's module globals: put them back after the test."""
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", layers._grad_accum_fusion_available)
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda",
                        getattr(layers, "fused_weight_gradient_mlp_cuda", None), raising=False)
