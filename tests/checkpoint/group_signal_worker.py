"""Worker for the process-group preemption test: a trainer that saved once (so the checkpoint
writer's helper processes exist), then waits for a signal sent to its whole process group, as
Slurm and a terminal's Ctrl-C send it, and must still write its preemption checkpoint.

    group_signal_worker.py SAVE_DIR sync|async
Prints "ready" after the first save; exits 0 after the preemption save completed.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_ratplus.checkpoint import CheckpointManager, PreemptionHandler  # noqa: E402
from megatron_ratplus.parallel import ParallelLayout, initialize_distributed  # noqa: E402
from tests.checkpoint.helpers import build, run_config, train_step  # noqa: E402


def main(save_dir, mode):
    initialize_distributed(ParallelLayout(), seed=1234)
    objs = build(run_config())
    handler = PreemptionHandler(signals=("SIGTERM", "SIGINT", "SIGUSR1")).install()
    mgr = CheckpointManager(save_dir, async_save=(mode == "async"))
    step = 1
    train_step(objs, step)
    mgr.save(step, objs.model, objs.optimizer, objs.scheduler, {"step": step})
    mgr.finalize()
    print("ready", flush=True)
    deadline = time.time() + 60
    while not handler.should_stop():
        if time.time() > deadline:
            print("no signal arrived", flush=True)
            return 3
        time.sleep(0.05)
    step += 1
    train_step(objs, step)
    mgr.save(step, objs.model, objs.optimizer, objs.scheduler, {"step": step})
    mgr.finalize()
    print(f"saved after {handler.received}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
