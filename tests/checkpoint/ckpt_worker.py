"""torchrun worker for the resharding tests: save under one parallel layout, load under another.

``save``: train 2 steps at the given layout, save at step 2 through CheckpointManager, then
train 2 more steps and record their losses (the reference: the first depends on the weights,
the second also on the restored Adam moments and LR schedule).
``load``: build at the given layout, load "latest", train the same 2 steps, record the losses (or
the CheckpointError that refused the load).
``--distributed-optimizer``: Megatron's distributed optimizer, built as on GPU (setup.py builds it on
GPU only), its checkpoint in ``--format``; ``--after-steps``: how many steps to record after the save;
``--async-save``: the save runs in the background while those steps train (as in the GPU recipes),
finalized at the end.
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
from tests.checkpoint.helpers import build, build_distributed_optimizer, run_config, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["save", "load"])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--distributed-optimizer", action="store_true")
    ap.add_argument("--format", default="dp_reshardable", help="checkpoint.optimizer_format")
    ap.add_argument("--after-steps", type=int, default=2)
    ap.add_argument("--async-save", action="store_true")
    a = ap.parse_args()
    initialize_distributed(ParallelLayout(a.tp, a.pp), seed=1234)
    cfg = run_config(tp=a.tp, pp=a.pp)
    objs = build_distributed_optimizer(cfg) if a.distributed_optimizer else build(cfg)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mgr = CheckpointManager(a.dir, optimizer_format=a.format, async_save=a.async_save)
    result = {"layout": [a.tp, a.pp, dp_size]}
    if a.action == "save":
        result["before"] = [train_step(objs, s, "sparse", dp_rank, dp_size) for s in range(2)]
        mgr.save(2, objs.model, objs.optimizer, objs.scheduler,
                 {"step": 2, "consumed_tokens": 2 * 4 * 16, "model_args": objs.model_args.to_dict()})
    else:
        try:
            state = mgr.load("latest", objs.model, objs.optimizer, objs.scheduler)
            result["train_state_step"] = state["step"]
        except CheckpointError as e:
            result["error"] = str(e)
    if "error" not in result:
        steps = range(2, 2 + a.after_steps)
        result["after"] = [train_step(objs, s, "dense", dp_rank, dp_size) for s in steps]
        result["lr"] = objs.optimizer.param_groups[0]["lr"]
    mgr.finalize()
    if dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
