"""Megatron-core ``ModuleSpec``s for RAT+ transformer layers.

* :func:`get_ratplus_layer_local_spec` uses only Megatron-core modules (Column/RowParallelLinear,
  MLP) plus our sequence-parallel-aware :class:`RMSNorm`: it needs neither Transformer-Engine nor
  apex and is what runs on CPU.
* :func:`get_ratplus_layer_te_spec` fuses the input RMSNorm into the projections with
  Transformer-Engine's ``TELayerNormColumnParallelLinear`` (attention and FFN), as Megatron's own
  GPT TE spec does. Available only when TE imports (NGC containers).

The layer is Megatron's ``TransformerLayer``: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .attention import RATPlusAttentionSubmodules, RATPlusSelfAttention
from .norm import RMSNorm
from .residual import get_linked_bias_dropout_add

try:  # Transformer-Engine is optional (present in NGC PyTorch containers).
    # Import TE itself first: Megatron's extension module imports without TE (with mock classes).
    import transformer_engine  # noqa: F401
    from megatron.core.extensions.transformer_engine import (
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    HAVE_TE = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_TE = False


def _layer_spec(norm, column_linear, row_linear, bda=get_bias_dropout_add) -> ModuleSpec:
    """A RAT+ TransformerLayer from a norm, column/row-parallel linear classes and a bias-dropout-add."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=RATPlusSelfAttention,
                submodules=RATPlusAttentionSubmodules(linear_in=column_linear, linear_out=row_linear),
            ),
            self_attn_bda=bda,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear)),
            mlp_bda=bda,
        ),
    )


def get_ratplus_layer_local_spec() -> ModuleSpec:
    """Layer spec built from Megatron-core modules only (works on CPU, no TE/apex). The norms hand
    their residual branch to the bias-dropout-adds (:mod:`.residual`)."""
    linked_norm = ModuleSpec(module=RMSNorm, params={"link_residual": True})
    return _layer_spec(linked_norm, ColumnParallelLinear, RowParallelLinear, bda=get_linked_bias_dropout_add)


def get_ratplus_layer_te_spec() -> ModuleSpec:
    """Layer spec with Transformer-Engine linears and the RMSNorm fused into them (no separate norm)."""
    if not HAVE_TE:
        raise RuntimeError("the Transformer-Engine spec needs transformer_engine; install the `te` "
                           "extra or use the local spec (model.spec=local)")
    return _layer_spec(IdentityOp, TELayerNormColumnParallelLinear, TERowParallelLinear)


def resolve_spec_name(name: str) -> str:
    """``auto`` picks TE when it imports, else local."""
    if name not in ("auto", "local", "te"):
        raise ValueError(f"model spec must be auto|local|te, got {name!r}")
    if name == "auto":
        return "te" if HAVE_TE else "local"
    return name


def get_ratplus_block_spec(config, spec: str = "auto", vp_stage=None, pp_rank=None) -> TransformerBlockSubmodules:
    """The decoder block for this pipeline stage: its layers plus the final RMSNorm.

    Built explicitly (rather than letting Megatron pick its default final norm, which refuses
    sequence parallelism without TE/apex).
    """
    spec = resolve_spec_name(spec)
    layer_spec = get_ratplus_layer_te_spec() if spec == "te" else get_ratplus_layer_local_spec()
    final_norm = TENorm if spec == "te" else RMSNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=final_norm)
