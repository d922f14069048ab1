"""torchrun worker: build a small model at PP = world size and save each layer's first weights."""
import argparse
import os
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_ratplus.model import RATPlusModelArgs, build_gpt_model, to_transformer_config  # noqa: E402
from megatron_ratplus.parallel import ParallelLayout, initialize_distributed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    initialize_distributed(ParallelLayout(1, int(os.environ["WORLD_SIZE"])), seed=1234)
    pp = dist.get_world_size()
    args = RATPlusModelArgs(num_layers=pp, hidden_size=32, num_attention_heads=2, vocab_size=64, max_seq_len=16)
    cfg = to_transformer_config(args, pipeline_model_parallel_size=pp, use_cpu_initialization=True)
    model = build_gpt_model(args, cfg, spec="local", pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage())
    rows = {layer.layer_number: layer.self_attention.linear_in.weight.detach().clone()
            for layer in model.decoder.layers}
    gathered = [None] * pp
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        torch.save({k: v for d in gathered for k, v in d.items()}, a.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
