"""SIGTERM / SIGUSR1 set the stop flag of a real process; ranks agree on when to stop."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ratplus.checkpoint import PreemptionHandler

from ..torchrun import REPO, torchrun

WORKER = Path(__file__).with_name("preempt_worker.py")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_sets_should_stop_in_subprocess(sig):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, str(WORKER), "wait", "SIGTERM,SIGUSR1"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"stopped by {sig}" in out


def test_unhandled_signal_is_not_swallowed():
    """Only the configured signals are caught: SIGUSR1 still kills a SIGTERM-only handler's process."""
    proc = subprocess.Popen([sys.executable, str(WORKER), "wait", "SIGTERM"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGUSR1)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGUSR1


def test_in_process_flag_and_uninstall():
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(signals=("SIGUSR1",)) as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.should_stop() and handler.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == previous
    assert not PreemptionHandler(start_time=0).time_exceeded(None)
    assert PreemptionHandler(start_time=0).time_exceeded(1.0)
    with pytest.raises(ValueError, match="unknown signal"):
        PreemptionHandler(signals=("SIGNOPE",))


@pytest.mark.slow
def test_ranks_agree_on_stop_step_and_time_limit(tmp_path):
    out = tmp_path / "agree.json"
    torchrun(WORKER, "agree", out, nproc=2)
    results = json.loads(out.read_text())
    assert [r["stopped_at"] for r in results] == [3, 3]
    assert [r["own_flag"] for r in results] == [False, True]   # rank 0 stopped on rank 1's signal
    assert [r["time_1min"] for r in results] == [True, True]   # only rank 0 is past a minute
    assert [r["time_5min"] for r in results] == [False, False]
    assert [r["time_none"] for r in results] == [False, False]


# A trainer-like process: preemption handler installed, helpers started shielded (or not), then
# SIGUSR1 to its whole process group, as Slurm's --signal sends it; prints whether the helpers survived.
_SHIELD_SCRIPT = """
import os, signal, sys, time
from megatron_ratplus.checkpoint import PreemptionHandler
from megatron_ratplus.checkpoint.preemption import start_compile_workers_shielded, start_resource_tracker_shielded
from multiprocessing import resource_tracker
from torch._inductor.async_compile import AsyncCompile
import torch._inductor.config as inductor_config
inductor_config.compile_threads = 2
handler = PreemptionHandler(signals=("SIGTERM", "SIGUSR1")).install()
if sys.argv[1] == "shielded":
    start_resource_tracker_shielded()
    assert start_compile_workers_shielded()
else:
    resource_tracker.ensure_running()
    AsyncCompile.warm_pool()
time.sleep(1)
os.killpg(0, signal.SIGUSR1)
time.sleep(1.5)
tracker_alive = os.waitpid(resource_tracker._resource_tracker._pid, os.WNOHANG) == (0, 0)
try:
    pool_works = AsyncCompile.process_pool().submit(abs, -3).result(timeout=60) == 3
except Exception:
    pool_works = False
print(handler.received, tracker_alive, pool_works)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shielded", "unshielded"])
def test_helpers_started_shielded_survive_a_signal_to_the_whole_job(mode):
    """The resource tracker (streaming's shared memory) and torch.compile's worker pool ignore a SIGUSR1
    sent to every process of the job; started plainly, both die of it (the control case)."""
    proc = subprocess.run([sys.executable, "-c", _SHIELD_SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                          timeout=300, start_new_session=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = "SIGUSR1 True True" if mode == "shielded" else "SIGUSR1 False False"
    assert proc.stdout.strip().splitlines()[-1] == expected, proc.stdout + proc.stderr[-3000:]
