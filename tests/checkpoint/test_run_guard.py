"""Guards around a save_dir: one run at a time (run lock), a tracker that lags a complete
checkpoint of the same run (an interrupted save) is caught up, leftovers of killed processes are
reported, and the checkpoint writer's helper survives a preemption signal sent to the whole
process group."""
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_ratplus import file_locks
from megatron_ratplus.checkpoint import CheckpointError, CheckpointManager, checkpoint_problems, paths
from megatron_ratplus.checkpoint.inspect_cli import main as ckpt_cli
from megatron_ratplus.checkpoint.paths import LOCK_NAME, TRACKER_NAME, read_tracker, write_tracker
from megatron_ratplus.checkpoint.validate import COMMON_NAME, TRAIN_STATE_KEY, decode_train_state, load_common

from ..torchrun import REPO
from .helpers import build, descendants, run_config, train_and_save

LOGGER = "megatron_ratplus.checkpoint"
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env():
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    return dict(env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


# A process holding the run lock of argv[1] until its stdin closes. With "fork", it forks a child
# that outlives it (as a stuck data-loader worker might) and exits right away.
HOLDER = r'''
import os, sys, time
from megatron_ratplus.checkpoint.paths import lock_save_dir
lock_save_dir(sys.argv[1])
if sys.argv[2] == "fork":
    if os.fork() == 0:                 # the child speaks once the at-fork handlers have run
        print(os.getpid(), flush=True)
        time.sleep(60)
    os._exit(0)
print("locked", flush=True)
sys.stdin.read()
'''


def start_holder(save_dir, mode="hold"):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(save_dir), mode], cwd=REPO, env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, megatron_world):
    """A save_dir with complete checkpoints 1, 2, 3 of one run, as the trainer stores them
    (run config with its save_dir and seed, tokens consumed)."""
    save_dir = tmp_path_factory.mktemp("guard") / "ckpt"
    cfg = run_config(extra=[f"checkpoint.save_dir={save_dir}"])
    objs = build(cfg)
    train_and_save(objs, save_dir, train_state=lambda step: {"consumed_tokens": 64 * step,
                                                             "run_config": cfg.to_dict()})
    return save_dir, objs, cfg


@pytest.fixture
def copy(run_dir, tmp_path):
    """A copy of the run's save_dir at the same recorded path (the run config names it)."""
    save_dir, objs, cfg = run_dir
    backup = tmp_path / "backup"
    shutil.copytree(save_dir, backup)
    yield save_dir, objs, cfg
    shutil.rmtree(save_dir)
    shutil.copytree(backup, save_dir)


# ------------------------------------------------------------------------------------------
# One run per save_dir
# ------------------------------------------------------------------------------------------
def test_a_second_run_is_refused_before_touching_the_save_dir(copy, caplog):
    save_dir, objs, _ = copy
    (save_dir / "iter_0000004").mkdir()            # an unfinished save the refused run must not move
    (save_dir / "iter_0000004" / "common.pt").write_bytes(b"partial")
    before = sorted(p.name for p in save_dir.iterdir())
    holder, ready = start_holder(save_dir)
    try:
        assert ready == "locked"
        mgr = CheckpointManager(save_dir)
        for attempt in (mgr.claim_save_dir,
                        lambda: mgr.load("latest", objs.model),
                        lambda: mgr.save(4, objs.model, objs.optimizer, objs.scheduler, {"step": 4})):
            with pytest.raises(CheckpointError, match="in use by another run") as err:
                attempt()
            assert str(save_dir) in str(err.value) and f"pid {holder.pid} on host" in str(err.value)
        assert sorted(p.name for p in save_dir.iterdir()) == before
        assert read_tracker(save_dir) == (3, None)
    finally:
        holder.kill()                 # killed, not closed: the kernel releases the lock
        holder.wait()
    mgr.claim_save_dir()              # the requeued run goes ahead
    assert f"pid={os.getpid()}" in (save_dir / LOCK_NAME).read_text()
    mgr.close()


def test_lock_is_held_until_close_and_shared_by_managers_of_one_process(copy):
    save_dir, _, _ = copy
    first, second = CheckpointManager(save_dir), CheckpointManager(save_dir)
    first.claim_save_dir()
    second.claim_save_dir()           # run.py builds one manager to resume and one to save
    first.close()
    holder, ready = start_holder(save_dir)
    holder.kill()
    holder.wait()
    assert ready == ""                # still held by `second`
    second.close()
    holder, ready = start_holder(save_dir)
    holder.stdin.close()
    holder.wait()
    assert ready == "locked"


def test_a_forked_child_does_not_keep_a_dead_run_locked(tmp_path):
    holder, child = start_holder(tmp_path, "fork")
    holder.wait()
    try:
        mgr = CheckpointManager(tmp_path)
        mgr.claim_save_dir()
        mgr.close()
    finally:
        os.kill(int(child), signal.SIGKILL)


def test_no_flock_support_warns_once_and_continues(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(file_locks.fcntl, "flock", no_flock)
    monkeypatch.setattr(paths, "_unsupported_warned", False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for name in ("a", "b"):
            mgr = CheckpointManager(tmp_path / name)
            mgr.claim_save_dir()
            mgr.close()
    assert caplog.text.count("does not support flock") == 1


# ------------------------------------------------------------------------------------------
# A tracker behind a complete checkpoint
# ------------------------------------------------------------------------------------------
def test_tracker_lagging_a_complete_checkpoint_of_the_run_is_caught_up(copy, caplog):
    from megatron_ratplus.training.run import _refuse_newer_checkpoints
    save_dir, objs, cfg = copy
    write_tracker(save_dir, 2)        # killed after iter_0000003 was complete, before the tracker moved
    mgr = CheckpointManager(save_dir)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        state = mgr.load("latest", objs.model, objs.optimizer, objs.scheduler)
    mgr.close()
    assert state["step"] == 3
    assert "interrupted" in caplog.text and "resuming from" in caplog.text
    assert read_tracker(save_dir) == (3, None)
    _refuse_newer_checkpoints(cfg, state["step"])       # the run can go on


def rewrite_train_state(ckpt: Path, **changes):
    common = load_common(ckpt)
    train_state = decode_train_state(common)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        if section == "model_args":
            train_state["model_args"][key] = value
        else:
            train_state["run_config"][section][key] = value
    import pickle
    common[TRAIN_STATE_KEY] = pickle.dumps(train_state)
    torch.save(common, ckpt / COMMON_NAME)


@pytest.mark.parametrize("change", [{"train__seed": 99}, {"checkpoint__save_dir": "/elsewhere/ckpt"},
                                    {"model_args__dilation": 8}])
def test_a_newer_checkpoint_of_another_run_is_still_ignored(copy, caplog, change):
    save_dir, objs, _ = copy
    rewrite_train_state(save_dir / "iter_0000003", **change)
    assert checkpoint_problems(save_dir / "iter_0000003") == []
    write_tracker(save_dir, 2)
    mgr = CheckpointManager(save_dir)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert mgr.load("latest", objs.model)["step"] == 2
    mgr.close()
    assert "ignoring iter_0000003" in caplog.text
    assert read_tracker(save_dir) == (2, None)


def test_explicit_load_of_an_older_checkpoint_leaves_the_tracker(copy):
    save_dir, objs, _ = copy
    mgr = CheckpointManager(save_dir)
    assert mgr.load(str(save_dir / "iter_0000001"), objs.model)["step"] == 1
    assert read_tracker(save_dir) == (3, None)


# ------------------------------------------------------------------------------------------
# Leftovers
# ------------------------------------------------------------------------------------------
def test_leftovers_are_reported_not_removed(copy, caplog, capsys):
    save_dir, _, _ = copy
    deleting = save_dir / ".deleting-iter_0000001-4242"
    shutil.copytree(save_dir / "iter_0000001", deleting)
    aside = save_dir / "iter_0000003.incomplete-20250101T000000"
    aside.mkdir()
    (aside / "common.pt").write_bytes(b"x" * 1000)
    size = sum(f.stat().st_size for f in deleting.iterdir())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        CheckpointManager(save_dir)
    for path in (deleting, aside):
        assert str(path) in caplog.text
    assert "1000 bytes" in caplog.text and paths.format_size(size) in caplog.text

    assert ckpt_cli(["list", str(save_dir)]) == 0
    out = capsys.readouterr().out
    assert f".deleting-iter_0000001-4242  {paths.format_size(size)}" in out and aside.name in out
    assert ckpt_cli(["list", "--json", str(save_dir)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {(Path(i["path"]).name, i["size_bytes"]) for i in listing["leftovers"]} == \
        {(deleting.name, size), (aside.name, 1000)}
    with caplog.at_level(logging.WARNING):
        assert ckpt_cli(["inspect", "--no-tensors", str(save_dir)]) == 0
    assert caplog.text.count(deleting.name) >= 2
    assert deleting.is_dir() and aside.is_dir()
    assert [it for it, _ in paths.list_iter_dirs(save_dir)] == [1, 2, 3]


# ------------------------------------------------------------------------------------------
# Preemption signal to the whole process group
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_group_sigterm_still_writes_the_preemption_checkpoint(tmp_path, mode):
    save_dir = tmp_path / "ckpt"
    worker = Path(__file__).with_name("group_signal_worker.py")
    proc = subprocess.Popen([sys.executable, str(worker), str(save_dir), mode], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-4000:]
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)   # every process of the job, as Slurm does
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    assert "saved after SIGTERM" in out
    assert checkpoint_problems(save_dir / "iter_0000002") == []
    assert read_tracker(save_dir) == (2, None)
    assert TRACKER_NAME in os.listdir(save_dir)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"       # a zombie nobody reaps (init in a container) has ended


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc (Linux)")
def test_writer_helper_dies_with_a_trainer_killed_outright(tmp_path):
    """The writer's Manager process ignores the preemption signals, so only the kernel's
    parent-death signal can end it when the trainer is SIGKILLed (OOM killer, torchrun restart)."""
    worker = Path(__file__).with_name("group_signal_worker.py")
    proc = subprocess.Popen([sys.executable, str(worker), str(tmp_path / "ckpt"), "sync"], cwd=REPO,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    helpers = []
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-4000:]
        helpers = [pid for pid in descendants(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert helpers, "no spawned writer helper found"
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while any(_alive(pid) for pid in helpers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in helpers), "the writer's helper outlived the killed trainer"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in helpers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
