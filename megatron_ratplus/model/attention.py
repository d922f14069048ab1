"""The RAT+ self-attention module for Megatron-core (DESIGN.md §1, steps 2–6).

One fused input projection (``ColumnParallelLinear``) produces the blocks ``(o, q, k, v, g)``
(``o`` only with the output gate, ``g`` only with the recurrence). Its rows are laid out
*head-interleaved*: row ``h * (n_blocks * d_h) + b * d_h + c`` is channel ``c`` of block ``b``
of head ``h``. Column-parallel sharding splits the rows into contiguous slices, so every
tensor-parallel rank holds whole heads of every block and the whole layer below runs per head
without communication. Checkpoints store the global (TP=1) layout, so resharding is a plain
row split.

Then: the full-sequence gated recurrence on (k, v) with gate ``sigmoid(g)`` in fp32, RoPE on q and
the recurrent keys, dense causal or sparse (D, W, P) attention, the output gate
``attn * sigmoid(o)`` and ``RowParallelLinear`` back to the hidden size. The residual add is the
TransformerLayer's bias-dropout-add, the input RMSNorm its ``input_layernorm`` (or fused into the
projection in the Transformer-Engine spec).

Under sequence parallelism the column-parallel projection all-gathers the sequence first, so the
recurrence always scans the full sequence on each rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ..ops import gated_recurrence, ratplus_attention
from ..ops.elementwise import output_gate, rope_qk
from ..ops.projection_split import split_projection
from .config import RATPlusTransformerConfig


@dataclass
class RATPlusAttentionSubmodules:
    linear_in: Union[ModuleSpec, type] = None
    linear_out: Union[ModuleSpec, type] = None


class RATPlusSelfAttention(MegatronModule):
    """RAT+ attention (or the attention baseline when the recurrence is off)."""

    def __init__(self, config: RATPlusTransformerConfig, submodules: RATPlusAttentionSubmodules,
                 layer_number: int, attn_mask_type=None, **kwargs):
        super().__init__(config=config)
        tp_size = config.tensor_model_parallel_size
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        self.num_heads_per_rank = config.num_attention_heads // tp_size
        self.use_output_gate = config.ratplus_output_gate
        self.use_recurrence = config.ratplus_recurrence
        self.block_names = (("o",) if self.use_output_gate else ()) + ("q", "k", "v") + \
            (("g",) if self.use_recurrence else ())
        self.num_blocks = len(self.block_names)
        self.softmax_scale = self.head_dim ** -0.5
        self.sparse_pattern = config.pattern_for_layer(layer_number)
        self.mode = config.ratplus_attention_mode
        self.kernel_backend = config.ratplus_kernel_backend
        projection_size = config.num_attention_heads * self.head_dim

        self.linear_in = build_module(
            submodules.linear_in,
            config.hidden_size,
            projection_size * self.num_blocks,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
        )
        self.linear_out = build_module(
            submodules.linear_out,
            projection_size,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
        )

    # Runtime switch used by joint (active recurrence) training: see model/mode.py.
    def set_mode(self, mode: str) -> None:
        if mode not in ("dense", "sparse"):
            raise ValueError(f"attention mode must be 'dense' or 'sparse', got {mode!r}")
        self.mode = mode

    def active_pattern(self):
        """The sparse pattern in effect, or None for dense attention."""
        return self.sparse_pattern if self.mode == "sparse" else None

    def split_projection(self, projected: torch.Tensor):
        """``[s, b, heads*blocks*d_h]`` -> (dict of ``[s, b, heads, d_h]`` strided views per block,
        the :class:`ProjectionGradient` that assembles their gradient in place)."""
        blocks, gradient = split_projection(projected, self.num_heads_per_rank, self.num_blocks, self.head_dim)
        return dict(zip(self.block_names, blocks)), gradient

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, rotary_pos_emb=None,
                **kwargs):
        projected, _ = self.linear_in(hidden_states)
        parts, gradient = self.split_projection(projected)

        def slots(*names):   # the backward of the block's consumer writes into its gradient slot
            return gradient.destination([self.block_names.index(n) for n in names])

        q, k, v = parts["q"], parts["k"], parts["v"]
        if self.use_recurrence:
            k, v, _ = gated_recurrence(parts["g"], k, v, backend=self.kernel_backend,
                                       grad_destination=slots("g", "k", "v"))
        if rotary_pos_emb is not None:
            freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            # k is still a projection block only without the recurrence (else it is k~)
            q, k = rope_qk(q, k, freqs, slots("q"), None if self.use_recurrence else slots("k"))
        attn = ratplus_attention(q, k, v, self.active_pattern(), scale=self.softmax_scale,
                                 backend=self.kernel_backend)
        if self.use_output_gate:
            attn = output_gate(attn, parts["o"], slots("o"))
        s, b = attn.shape[:2]
        output, bias = self.linear_out(attn.reshape(s, b, -1))
        return output, bias

    def extra_repr(self) -> str:
        p = self.sparse_pattern
        return (f"layer={self.layer_number}, heads/rank={self.num_heads_per_rank}, d_h={self.head_dim}, "
                f"blocks={''.join(self.block_names)}, mode={self.mode}, "
                f"sparse=(D={p.dilation}, W={p.window}, P={p.initial})")
