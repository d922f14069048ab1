"""torchrun worker for the distributed optimizer's checkpoints (built as on GPU, over gloo).

``save``: train 2 steps at the given layout, save at step 2, train 3 more steps and record their
losses. ``load``: build at the given layout, load "latest", train the same 3 steps, record them.
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

from megatron_ratplus.checkpoint import CheckpointError, CheckpointManager  # noqa: E402
from megatron_ratplus.parallel import ParallelLayout, initialize_distributed  # noqa: E402
from tests.checkpoint.helpers import build_distributed_optimizer, run_config, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["save", "load"])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--format", default="dp_reshardable", help="checkpoint.optimizer_format")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    initialize_distributed(ParallelLayout(a.tp, a.pp), seed=1234)
    objs = build_distributed_optimizer(run_config(tp=a.tp, pp=a.pp))
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mgr = CheckpointManager(a.dir, optimizer_format=a.format)
    result = {"layout": [a.tp, a.pp, dp_size]}
    if a.action == "save":
        result["before"] = [train_step(objs, s, "sparse", dp_rank, dp_size) for s in range(2)]
        mgr.save(2, objs.model, objs.optimizer, objs.scheduler,
                 {"step": 2, "consumed_tokens": 2 * 4 * 16, "model_args": objs.model_args.to_dict()})
    else:
        try:
            result["train_state_step"] = mgr.load("latest", objs.model, objs.optimizer, objs.scheduler)["step"]
        except CheckpointError as e:
            result["error"] = str(e)
    if "error" not in result:
        result["after"] = [train_step(objs, s, "dense", dp_rank, dp_size) for s in (2, 3, 4)]
        result["lr"] = objs.optimizer.param_groups[0]["lr"]
    if dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
