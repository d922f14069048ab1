"""Process-group set-up: torch.distributed + Megatron parallel state, on GPU or in CPU mode."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from .cpu_mode import enable_cpu_mode


@dataclass
class ParallelLayout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    sequence_parallel: bool = False

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not divisible by tensor_parallel × "
                             f"pipeline_parallel = {self.tensor_parallel} × {self.pipeline_parallel}")
        return world_size // model_parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_distributed(layout: ParallelLayout, seed: int = 1234, timeout_minutes: int = 30) -> dict:
    """Initialise torch.distributed (NCCL on GPU, gloo in CPU mode) and Megatron's parallel state.

    Works under torchrun (reads RANK/WORLD_SIZE/LOCAL_RANK) and as a plain single process.
    Returns ``{"rank", "world_size", "local_rank", "cpu_mode", "dp_size"}``.
    """
    cpu = enable_cpu_mode()
    if not dist.is_initialized():
        if not cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kwargs = dict(backend="gloo" if cpu else "nccl", timeout=datetime.timedelta(minutes=timeout_minutes))
        if "WORLD_SIZE" not in os.environ:
            # A plain single process: a private rendezvous, without writing RANK/MASTER_PORT into
            # the environment (child processes would inherit them and collide on the port).
            kwargs.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group(**kwargs)
    world = dist.get_world_size()
    dp = layout.data_parallel_size(world)
    if parallel_state.model_parallel_is_initialized():
        _check_same_layout(layout)
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel,
            pipeline_model_parallel_size=layout.pipeline_parallel,
            virtual_pipeline_model_parallel_size=layout.virtual_pipeline_parallel,
            distributed_timeout_minutes=timeout_minutes,
        )
    # Each pipeline stage draws its layers from its own stream (Megatron-LM's seed + 100 x stage):
    # with one seed everywhere, every stage after the first (whose embedding shifts its stream)
    # would initialise its layers identically.
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)
    return {"rank": dist.get_rank(), "world_size": world, "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "cpu_mode": cpu, "dp_size": dp}


def _check_same_layout(layout: ParallelLayout) -> None:
    """Megatron's parallel state exists already (a second call in one process): it must be the
    requested layout, or every size derived from the request would be wrong."""
    current = (parallel_state.get_tensor_model_parallel_world_size(),
               parallel_state.get_pipeline_model_parallel_world_size(),
               parallel_state.get_virtual_pipeline_model_parallel_world_size())
    requested = (layout.tensor_parallel, layout.pipeline_parallel, layout.virtual_pipeline_parallel)
    if current != requested:
        raise RuntimeError(f"Megatron's parallel state is already initialised with TP, PP, VPP = {current}; "
                           f"this call asks for {requested}: call destroy_distributed() first")


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
