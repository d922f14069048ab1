"""One forward/backward over a global batch through Megatron's pipeline schedules.

Batches arrive as ``LongTensor [micro_batch, seq_len + 1]`` (inputs and shifted labels in one
sample). The same function serves PP=1 (no pipelining), 1F1B and interleaved 1F1B: Megatron picks
the schedule from the parallel state.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


def split_batch(tokens: torch.Tensor):
    """``[b, s+1]`` -> inputs ``[b, s]``, labels ``[b, s]``, position ids ``[b, s]``."""
    inputs = tokens[:, :-1].contiguous()
    labels = tokens[:, 1:].contiguous()
    positions = torch.arange(inputs.shape[1], device=tokens.device).unsqueeze(0).expand_as(inputs)
    return inputs, labels, positions


def lm_loss_func(per_token_loss: torch.Tensor):
    """Megatron's 3-tuple loss convention: (sum, token count, report)."""
    losses = per_token_loss.float()
    loss_sum = losses.sum()
    # A fill kernel, not a host-to-device copy: capturable in a CUDA graph, no copy per micro-batch.
    num_tokens = torch.full((), losses.numel(), dtype=torch.int, device=losses.device)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    tokens = next(data_iterator)
    inputs, labels, positions = split_batch(tokens)
    per_token_loss = model(inputs, positions, None, labels=labels)
    return per_token_loss, lm_loss_func


def forward_backward(model_chunks: Sequence[torch.nn.Module], microbatches: List[torch.Tensor], *,
                     seq_len: int, forward_only: bool = False) -> torch.Tensor:
    """Run the pipeline schedule on ``microbatches``; return the mean token loss on every rank.

    The loss is averaged over all tokens of the global batch (all micro-batches and DP ranks), and
    broadcast from the last pipeline stage so rank 0 can log it.
    """
    chunks = list(model_chunks)
    iterators = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=microbatches[0].shape[0],
        forward_only=forward_only,
    )
    device = microbatches[0].device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for report in losses:
            total += report["lm loss"].to(torch.float64)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(total, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp(min=1)).float()
