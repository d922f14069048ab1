"""torchrun worker for the resharding tests: save under one parallel layout, load under another.

``save``: train 2 steps at the given layout, save at step 2 through CheckpointManager, then
train 2 more steps and record their losses (the reference: the first depends on the weights,
the second also on the restored Adam moments and LR schedule).
``load``: build at the given layout, load "latest", train the same 2 steps, record the losses.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_ratplus.checkpoint import CheckpointManager  # noqa: E402
from megatron_ratplus.parallel import ParallelLayout, initialize_distributed  # noqa: E402
from tests.checkpoint.helpers import build, run_config, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["save", "load"])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    initialize_distributed(ParallelLayout(a.tp, a.pp), seed=1234)
    objs = build(run_config(tp=a.tp, pp=a.pp))
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mgr = CheckpointManager(a.dir)
    result = {"layout": [a.tp, a.pp, dp_size]}
    if a.action == "save":
        result["before"] = [train_step(objs, s, "sparse", dp_rank, dp_size) for s in range(2)]
        mgr.save(2, objs.model, objs.optimizer, objs.scheduler,
                 {"step": 2, "consumed_tokens": 2 * 4 * 16, "model_args": objs.model_args.to_dict()})
    else:
        state = mgr.load("latest", objs.model, objs.optimizer, objs.scheduler)
        result["train_state_step"] = state["step"]
    result["after"] = [train_step(objs, s, "dense", dp_rank, dp_size) for s in (2, 3)]
    result["lr"] = objs.optimizer.param_groups[0]["lr"]
    if dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
