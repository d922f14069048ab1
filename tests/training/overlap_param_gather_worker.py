"""Worker (torchrun, 2 processes, gloo, CPU mode): DP=2 training with the distributed optimizer and
``parallel.overlap_param_gather=true``, which setup.py enables on GPU only; forced on here (gloo has the
all-gather and reduce-scatter they need). Every checkpoint save must see the same, fully updated weights
on both data-parallel replicas."""
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore")

from megatron_ratplus.parallel import ParallelLayout, initialize_distributed  # noqa: E402
from megatron_ratplus.training.config import load_config  # noqa: E402
from megatron_ratplus.training.loop import Trainer  # noqa: E402
from tests.checkpoint.helpers import build_distributed_optimizer  # noqa: E402
from tests.training.test_loop import VOCAB, SyntheticData  # noqa: E402


class RecordingCheckpoints:
    """Stands in for the checkpoint manager: at each save, compares the two replicas' model weights."""

    def __init__(self):
        self.saves = []

    def save(self, step, model, optimizer, scheduler, state):
        flat = torch.cat([p.detach().reshape(-1) for chunk in model for p in chunk.module.parameters()])
        replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(replicas, flat)
        self.saves.append((step, max((r - replicas[0]).abs().max().item() for r in replicas)))
        return f"step {step}"

    def maybe_finalize(self):
        pass

    def finalize(self):
        pass


def main():
    info = initialize_distributed(ParallelLayout(), seed=1234)
    cfg = load_config(None, ["train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4",
                             "train.max_steps=3", "train.precision=fp32", "train.lr=3e-3",
                             "train.warmup_fraction=0.0", "logging.progress=false", "logging.eval_interval=null",
                             "checkpoint.save_interval=2", "model.num_layers=2", "model.hidden_size=64",
                             "model.num_attention_heads=2", "model.dilation=4",
                             "parallel.distributed_optimizer=true", "parallel.overlap_param_gather=true"])
    _, accum = cfg.layout_for(dist.get_world_size())
    args = cfg.model.model_args(vocab_size=VOCAB, seq_len=32)
    objs = build_distributed_optimizer(cfg, args, cfg.total_steps())
    assert objs.model[0].ddp_config.overlap_param_gather
    checkpoints = RecordingCheckpoints()
    data = SyntheticData(32, 2, seed=dist.get_rank())        # each replica its own samples
    Trainer(cfg, objs, data, world_size=dist.get_world_size(), rank=info["rank"], total_steps=cfg.total_steps(),
            accum_steps=accum, checkpoints=checkpoints).run()
    print(f"rank {dist.get_rank()} saves (step, max weight difference between replicas): {checkpoints.saves}")
    assert [step for step, _ in checkpoints.saves] == [2, 3], checkpoints.saves
    assert all(diff == 0 for _, diff in checkpoints.saves), (
        f"the data-parallel replicas hold different weights when a checkpoint is saved: {checkpoints.saves}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
