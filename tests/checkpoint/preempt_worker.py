"""Worker for the preemption tests.

``wait``: install the handler, print "ready", poll ``should_stop()`` as a training loop would, then
print what stopped it and exit 0 (the parent sends the signal).
``agree`` (under torchrun, gloo): rank 1 signals itself after step 3; every rank must stop after
the same step. Then the wall-time limit: only rank 0 is past it, every rank must see it.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_ratplus.checkpoint import PreemptionHandler  # noqa: E402


def wait(signal_names):
    handler = PreemptionHandler(signals=signal_names).install()
    print("ready", flush=True)
    steps = 0
    deadline = time.time() + 60
    while not handler.should_stop():
        steps += 1
        time.sleep(0.01)
        if time.time() > deadline:
            print("no signal arrived", flush=True)
            return 3
    print(f"stopped by {handler.received} after {steps} steps", flush=True)
    return 0


def agree(out):
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    start = time.time() - (120 if rank == 0 else 0)
    handler = PreemptionHandler(start_time=start).install()
    stopped_at = None
    for step in range(1, 50):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.02 if rank == 0 else 0.0)   # ranks run at different speeds
        if handler.should_stop():
            stopped_at = step
            break
    result = {"rank": rank, "stopped_at": stopped_at, "own_flag": handler.signal_received,
              "time_1min": handler.time_exceeded(1.0), "time_5min": handler.time_exceeded(5.0),
              "time_none": handler.time_exceeded(None)}
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "wait":
        sys.exit(wait(sys.argv[2].split(",")))
    sys.exit(agree(sys.argv[2]))
