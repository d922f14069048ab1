"""Build RAT+ models as Megatron-core ``GPTModel``s."""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel

from .config import RATPlusModelArgs, RATPlusTransformerConfig, pad_vocab_size
from .specs import get_ratplus_block_spec


def build_gpt_model(
    args: RATPlusModelArgs,
    config: RATPlusTransformerConfig,
    *,
    spec: str = "auto",
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> GPTModel:
    """One model chunk (a pipeline stage, or a virtual stage of it).

    Untied embedding and LM head, RoPE (rotate-half, ``args.rope_base``) applied inside the RAT+
    attention after the recurrence, vocab padded for tensor parallelism.
    """
    block_spec = get_ratplus_block_spec(config, spec=spec, vp_stage=vp_stage, pp_rank=pp_rank)
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=pad_vocab_size(args.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=args.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=args.rope_base,
        vp_stage=vp_stage,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
