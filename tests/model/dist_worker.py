"""torchrun worker: one forward/backward of a small RAT+ model under a given TP/SP/PP layout.

Writes (on rank 0) the mean loss and every parameter's gradient, gathered to the global TP=1 /
PP=1 names and shapes, so the test can compare layouts. Uses the real Megatron path: DDP,
the pipeline schedule, finalize_model_grads (which all-reduces sequence-parallel norm grads).
"""
import argparse
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed import finalize_model_grads  # noqa: E402

from megatron_ratplus.model import RATPlusModelArgs, build_gpt_model, set_attention_mode, to_transformer_config  # noqa: E402
from megatron_ratplus.parallel import ParallelLayout, initialize_distributed  # noqa: E402
from megatron_ratplus.training.step import forward_backward  # noqa: E402


def global_name(model, name):
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        local = int(parts[i + 1])
        parts[i + 1] = str(model.decoder.layers[local].layer_number - 1)
    return ".".join(parts)


def _glu_fc1(name, p, swiglu):
    return swiglu and name.endswith("mlp.linear_fc1.weight")


def _shard(full, p, tp_size, tp_rank, glu):
    """This rank's shard of a full (TP=1) tensor. A SwiGLU fc1 holds [gate; up] and each rank
    [gate_r; up_r] (Megatron's MLP chunks its fc1 output in two)."""
    if glu:
        return torch.cat([half.chunk(tp_size, dim=0)[tp_rank] for half in full.chunk(2, dim=0)])
    return full.chunk(tp_size, dim=p.partition_dim)[tp_rank]


def _unshard(parts, p, glu):
    if glu:
        halves = [part.chunk(2, dim=0) for part in parts]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(parts, dim=p.partition_dim)


def deterministic_weights(model, tp_size, swiglu=False):
    """Overwrite every parameter with values that depend only on its global name.

    Each pipeline stage has its own seed (parallel.initialize_distributed), so PP=2 and PP=1 would
    otherwise build different models; TP shards are cut from the same full tensor.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gname = global_name(model, name)
            full_shape = list(p.shape)
            sharded = getattr(p, "tensor_model_parallel", False) and tp_size > 1
            if sharded:
                full_shape[p.partition_dim] *= tp_size
            seed = sum(ord(c) * (i + 1) for i, c in enumerate(gname)) % (2 ** 31)
            full = torch.randn(full_shape, generator=torch.Generator().manual_seed(seed))
            full = 1.0 + 0.1 * full if "layernorm" in gname else 0.05 * full
            if sharded:
                full = _shard(full, p, tp_size, tp_rank, _glu_fc1(name, p, swiglu))
            p.copy_(full)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--mode", default="dense")
    ap.add_argument("--kernel-backend", default="reference")
    ap.add_argument("--baseline", action="store_true", help="attention baseline (recurrence off)")
    ap.add_argument("--no-output-gate", action="store_true")
    ap.add_argument("--swiglu", action="store_true")
    ap.add_argument("--hybrid", action="store_true", help="per-layer D/W/P lists")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    layout = ParallelLayout(a.tp, a.pp, a.vpp, a.sp)
    initialize_distributed(layout, seed=1234)
    pattern = (dict(dilation=[4, 1, -1, 3], local_window=[1, 0, 2, 0], initial_tokens=[1, 0, 0, 2])
               if a.hybrid else dict(dilation=4, local_window=1, initial_tokens=1))
    args = RATPlusModelArgs(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=100,
                            max_seq_len=32, recurrence=not a.baseline, output_gate=not a.no_output_gate,
                            ffn_type="swiglu" if a.swiglu else "gelu",
                            ffn_hidden_size=96 if a.swiglu else None, **pattern)
    cfg = to_transformer_config(args, tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                                virtual_pipeline_model_parallel_size=a.vpp, sequence_parallel=a.sp,
                                use_cpu_initialization=True, kernel_backend=a.kernel_backend)
    chunks = []
    for stage in (range(a.vpp) if a.vpp else [None]):     # interleaved: several chunks per rank
        chunk = build_gpt_model(args, cfg, spec="local", vp_stage=stage,
                                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                                                   vp_stage=stage),
                                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                                                   vp_stage=stage))
        deterministic_weights(chunk, a.tp, a.swiglu)
        chunks.append(chunk)
    ddp = [DistributedDataParallel(cfg, DistributedDataParallelConfig(), chunk, disable_bucketing=i > 0)
           for i, chunk in enumerate(chunks)]
    cfg.no_sync_func = [m.no_sync for m in ddp] if len(ddp) > 1 else ddp[0].no_sync
    cfg.finalize_model_grads_func = finalize_model_grads
    set_attention_mode(ddp, a.mode)
    gen = torch.Generator().manual_seed(7)
    microbatches = [torch.randint(0, 100, (2, 17), generator=gen) for _ in range(4)]
    for m in ddp:
        m.zero_grad_buffer()
    # The schedule itself calls config.finalize_model_grads_func at its end.
    loss = forward_backward(ddp, microbatches, seq_len=16)

    grads = {}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            g = p.main_grad.detach().clone()
            if getattr(p, "tensor_model_parallel", False) and a.tp > 1:
                parts = [torch.empty_like(g) for _ in range(a.tp)]
                dist.all_gather(parts, g, group=tp_group)
                g = _unshard(parts, p, _glu_fc1(name, p, a.swiglu))
            grads[global_name(chunk, name)] = g
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, grads)
    if dist.get_rank() == 0:
        merged = {}
        for d in gathered:
            merged.update(d)
        torch.save({"loss": loss.item(), "grads": merged}, a.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
