"""Build what a training run holds: model chunks (DDP-wrapped), optimizer and LR scheduler.

Everything is Megatron-core machinery: ``GPTModel`` chunks (one per virtual pipeline stage),
``Float16Module`` for bf16, ``DistributedDataParallel`` (gradient buckets, overlapped reduce on
GPU), ``get_megatron_optimizer`` (AdamW; distributed optimizer shards its state over DP on GPU)
and ``OptimizerParamScheduler`` (linear warmup, cosine decay to ``min_lr``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from ..checkpoint.state import inner_optimizers
from ..cpu_mode import cpu_mode_enabled
from ..model import RATPlusModelArgs, build_gpt_model, to_transformer_config
from . import fused_optimizer_update, fused_wgrad, multi_tensor
from .cuda_graph import ForwardBackwardGraphs
from .config import ConfigError, RunConfig


@dataclass
class TrainingObjects:
    model_args: RATPlusModelArgs
    transformer_config: object
    model: List[torch.nn.Module]        # DDP-wrapped chunks
    optimizer: object
    scheduler: OptimizerParamScheduler
    step_graphs: Optional[ForwardBackwardGraphs] = None   # train.cuda_graph


def build_step_graphs(cfg: RunConfig) -> Optional[ForwardBackwardGraphs]:
    """The CUDA graphs of the training forward/backward when ``train.cuda_graph`` is on."""
    if not cfg.train.cuda_graph:
        return None
    if cpu_mode_enabled() or not torch.cuda.is_available():
        raise ConfigError("train.cuda_graph=true needs a GPU (this run is in CPU mode); set it to false")
    return ForwardBackwardGraphs(cfg.train.cuda_graph_warmup_steps)


def use_gradient_accumulation_fusion(cfg: RunConfig) -> bool:
    """Resolve ``train.gradient_accumulation_fusion`` (None: on where it works, on GPU) and register the
    torch weight-gradient GEMMs with Megatron's linear layers when it is on and apex is absent."""
    requested = cfg.train.gradient_accumulation_fusion
    if requested is False or (requested is None and cpu_mode_enabled()):
        return False
    device = torch.device("cpu") if cpu_mode_enabled() else torch.device("cuda", torch.cuda.current_device())
    if not fused_wgrad.available(device):
        if requested:
            raise ConfigError("train.gradient_accumulation_fusion=true, but neither apex's "
                              "fused_weight_gradient_mlp_cuda nor torch's fp32-output GEMM "
                              f"(torch.addmm out_dtype, torch >= 2.8) works on {device}; set it to false")
        return False
    fused_wgrad.install()
    return True


def build_transformer_config(cfg: RunConfig, args: RATPlusModelArgs):
    p, t = cfg.parallel, cfg.train
    bf16 = t.precision == "bf16"
    return to_transformer_config(
        args,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_parallel,
        sequence_parallel=p.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        use_cpu_initialization=cpu_mode_enabled() or cfg.parallel.cpu_initialization,
        kernel_backend=cfg.model.kernel_backend,
        recompute_granularity=t.recompute,
        recompute_method="uniform" if t.recompute == "full" else None,
        recompute_num_layers=1 if t.recompute == "full" else None,
        # Megatron's fused (torch.compile'd) vocab-parallel cross entropy on GPU.
        cross_entropy_loss_fusion=not cpu_mode_enabled(),
        cross_entropy_fusion_impl="native",
        gradient_accumulation_fusion=use_gradient_accumulation_fusion(cfg),
    )


def build_model_chunks(cfg: RunConfig, args: RATPlusModelArgs, tconfig) -> List[torch.nn.Module]:
    """Unwrapped ``GPTModel`` chunks of this rank (several with virtual pipelining)."""
    vpp = cfg.parallel.virtual_pipeline_parallel
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = build_gpt_model(
            args, tconfig, spec=cfg.model.spec,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        )
        if not cpu_mode_enabled():
            chunk.cuda(torch.cuda.current_device())
        if tconfig.bf16:
            chunk = Float16Module(tconfig, chunk)
        chunks.append(chunk)
    return chunks


def wrap_ddp(cfg: RunConfig, tconfig, chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
    on_gpu = not cpu_mode_enabled()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce and on_gpu,
        overlap_param_gather=cfg.parallel.overlap_param_gather and on_gpu,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer and on_gpu,
        check_for_nan_in_grad=False,
    )
    wrapped = [DistributedDataParallel(tconfig, ddp_config, chunk, disable_bucketing=(i > 0))
               for i, chunk in enumerate(chunks)]
    # Hooks the pipeline schedules call: gradient sync deferral and the final reductions.
    tconfig.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    tconfig.grad_sync_func = None
    tconfig.finalize_model_grads_func = finalize_model_grads
    if ddp_config.overlap_grad_reduce:
        tconfig.grad_sync_func = [m.start_grad_sync for m in wrapped] if len(wrapped) > 1 \
            else wrapped[0].start_grad_sync
    return wrapped


def build_optimizer(cfg: RunConfig, tconfig, model: List[torch.nn.Module]):
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=tconfig.bf16,
        params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer and not cpu_mode_enabled(),
    )
    multi_tensor.install()   # device-side grad norm and clipping where Megatron lacks TE/apex
    optimizer = get_megatron_optimizer(opt_config, model)
    if not cpu_mode_enabled():
        use_fused_adamw(optimizer)
    try:
        fused_optimizer_update.install(optimizer, cfg.train.fused_optimizer_update)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return optimizer


def use_fused_adamw(optimizer) -> int:
    """Switch torch AdamW (Megatron's optimizer without TE/apex) to its fused CUDA kernel.

    Megatron builds ``torch.optim.AdamW`` with default (foreach) kernels when TE/apex are absent;
    the fused implementation does the whole update in one pass over master params and moments.
    Returns the number of param groups switched (0 with TE/apex FusedAdam, already fused).
    """
    switched = 0
    for opt in inner_optimizers(optimizer):
        torch_opt = getattr(opt, "optimizer", None)
        if isinstance(torch_opt, (torch.optim.AdamW, torch.optim.Adam)):
            for group in torch_opt.param_groups:
                if all(p.is_cuda and p.dtype == torch.float32 for p in group["params"]):
                    group["fused"], group["foreach"] = True, False
                    switched += 1
    return switched


def build_scheduler(cfg: RunConfig, optimizer, total_steps: int) -> OptimizerParamScheduler:
    """Warmup ``warmup_fraction`` of the steps from 0, then decay to ``min_lr`` at the last step.

    The scheduler counts global batches: a joint step (sparse update + dense update) advances it
    once, as in the paper.
    """
    t = cfg.train
    warmup = int(round(t.warmup_fraction * total_steps))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        # "strict" is checked with a readable message before loading (checkpoint/manager.py)
        use_checkpoint_opt_param_scheduler=cfg.checkpoint.lr_schedule_on_resume == "checkpoint",
        override_opt_param_scheduler=cfg.checkpoint.lr_schedule_on_resume == "config",
    )


def build_training_objects(cfg: RunConfig, args: RATPlusModelArgs, total_steps: int) -> TrainingObjects:
    step_graphs = build_step_graphs(cfg)     # refuses an impossible request before the model is built
    tconfig = build_transformer_config(cfg, args)
    chunks = build_model_chunks(cfg, args, tconfig)
    # with CUDA graphs, DDP's gradient nodes must live on the capture stream (training/cuda_graph.py)
    with step_graphs.capture_stream_context() if step_graphs else contextlib.nullcontext():
        model = wrap_ddp(cfg, tconfig, chunks)
    optimizer = build_optimizer(cfg, tconfig, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    return TrainingObjects(args, tconfig, model, optimizer, scheduler, step_graphs)
