"""Multi-tensor Triton kernel for the AdamW update with a low-precision model copy (contract and
reference in :mod:`.naive`).

Why: without Transformer-Engine or apex, a bf16 Megatron model's optimizer step runs torch's fused
AdamW over the fp32 master weights (read param, grad and both moments; write param and both
moments) and then copies every master weight into the model's bf16 weight, one kernel per tensor
(read the fp32 weight again, write bf16). For the 1.5B model that is 52 GB of traffic a step in
~150 launches. Here one pass reads 16 bytes and writes 14 per parameter (46 GB), in one launch per
parameter group. Gradient clipping's coefficient (``grad_scale``) is applied to each gradient as it is
read, which saves the separate pass that would rewrite every gradient (another 12 GB) when the step
clips.

How: the tensors stay where Megatron put them. A table holds each tensor's addresses (param, grad,
moments, step count, model copy or 0) and size; a second table maps each program to (tensor, first
element) for blocks of ``BLOCK`` elements. Programs cast the addresses back to typed pointers, so
any number of tensors of any sizes is one launch. The tables are built once per set of tensors and
reused while the addresses stay the same (Megatron's buffers do not move between steps).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .naive import check_adamw_lists, check_grad_scale

BLOCK = 1024          # elements per program: 4 KB per fp32 stream, 8 per thread at 4 warps (H200 sweep,
                      # 4 / 8 warps: 4.1 / 4.1 TB/s; 2048 elements 3.3 / 3.7, 4096 1.3 / 3.1, 8192 0.3 / 1.3)
NUM_WARPS = 4
_LOW_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _adamw_kernel(BLOCK_TENSOR, BLOCK_START, P_ADDR, G_ADDR, M_ADDR, V_ADDR, S_ADDR, LOW_ADDR, NUMEL,
                  lr, beta1, beta2, eps, decay_factor, log2_beta1, log2_beta2, grad_scale,
                  LOW_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(BLOCK_TENSOR + pid)
    offs = tl.load(BLOCK_START + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(NUMEL + t)
    p_ptr = tl.load(P_ADDR + t).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(G_ADDR + t).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(M_ADDR + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(V_ADDR + t).to(tl.pointer_type(tl.float32))
    step = tl.load(tl.load(S_ADDR + t).to(tl.pointer_type(tl.float32)))
    bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)
    bias_correction2 = 1.0 - tl.exp2(step * log2_beta2)

    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0) * grad_scale
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = p * decay_factor
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), tl.sqrt_rn(bias_correction2)) + eps
    p = p - tl.div_rn(lr, bias_correction1) * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    low_addr = tl.load(LOW_ADDR + t)
    if low_addr != 0:
        tl.store(low_addr.to(tl.pointer_type(LOW_DTYPE)) + offs, p.to(LOW_DTYPE), mask=mask)


class _Tables:
    """Address and block tables of one set of tensors (see the module docstring)."""

    def __init__(self, lists: Tuple[Sequence[Optional[torch.Tensor]], ...], device: torch.device):
        params = lists[0]
        numels = [p.numel() for p in params]
        addresses = [[0 if t is None else t.data_ptr() for t in tensors] for tensors in lists]
        self.addresses = torch.tensor(addresses, dtype=torch.int64).to(device)   # [6, n]: p g m v step low
        self.numel = torch.tensor(numels, dtype=torch.int64).to(device)
        blocks = [triton.cdiv(n, BLOCK) for n in numels]
        tensor_of_block = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(blocks))
        first_block = torch.tensor([0] + blocks[:-1]).cumsum(0)
        start = (torch.arange(len(tensor_of_block)) - first_block[tensor_of_block]) * BLOCK
        self.block_tensor = tensor_of_block.to(torch.int32).to(device)
        self.block_start = start.to(torch.int64).to(device)
        self.num_blocks = len(tensor_of_block)


_TABLES: "OrderedDict[tuple, _Tables]" = OrderedDict()
_MAX_TABLES = 16      # one set per parameter group and optimizer; a few models per process at most


def _tables_for(lists) -> _Tables:
    # address, size and dtype: tensors allocated where freed ones were get checked again if they differ
    key = tuple((t.data_ptr(), t.numel(), t.dtype) if t is not None else None
                for tensors in lists for t in tensors)
    tables = _TABLES.get(key)
    if tables is None:
        check_adamw_lists(*lists)
        tables = _Tables(lists, lists[0][0].device)
        _TABLES[key] = tables
        while len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return tables


class PreparedAdamWUpdate:
    """The host side of :func:`fused_adamw_update` for one set of tensors, done before the launch.

    Why: Megatron's step reads the gradient norm (a host sync) between collecting the gradients
    and running the update. Everything that does not depend on the norm, learning rate or step
    (the tensor lists, the table lookup keyed by ~2,000 addresses, the contract check on first
    use) can be done while the GPU still runs the backward, so that after the norm is read only
    the launches remain.
    """

    def __init__(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                 steps: Sequence[torch.Tensor], model_params: Sequence[Optional[torch.Tensor]]):
        lists = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps), list(model_params))
        self.params, self.grads, self.steps = lists[0], lists[1], lists[4]
        self.tables = _tables_for(lists) if self.params else None
        self.low_dtype = next((m.dtype for m in model_params if m is not None), torch.bfloat16)

    @torch.no_grad()
    def launch(self, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               grad_scale: float = 1.0) -> None:
        """Count the steps and run the update (two launches)."""
        if self.tables is None:
            return
        check_grad_scale(grad_scale)
        if not (0.0 < beta1 < 1.0 and 0.0 < beta2 < 1.0):
            raise ValueError(f"adamw update: betas must lie in (0, 1), got {beta1}, {beta2}")
        torch._foreach_add_(self.steps, 1.0)
        tables, a = self.tables, self.tables.addresses
        _adamw_kernel[(tables.num_blocks,)](
            tables.block_tensor, tables.block_start, a[0], a[1], a[2], a[3], a[4], a[5], tables.numel,
            lr, beta1, beta2, eps, 1.0 - lr * weight_decay, math.log2(beta1), math.log2(beta2), grad_scale,
            LOW_DTYPE=_LOW_DTYPES[self.low_dtype], BLOCK=BLOCK, num_warps=NUM_WARPS,
        )


@torch.no_grad()
def fused_adamw_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                       steps: Sequence[torch.Tensor], model_params: Sequence[Optional[torch.Tensor]],
                       *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                       grad_scale: float = 1.0) -> None:
    """The update of :mod:`.naive` for every tensor in one launch (plus one to count the steps).
    The contract is checked when a set of tensors is first seen; the same addresses later reuse
    the tables without checking again. :class:`PreparedAdamWUpdate` splits the host work from the
    launch."""
    PreparedAdamWUpdate(params, grads, exp_avgs, exp_avg_sqs, steps, model_params).launch(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale)
