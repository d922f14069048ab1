"""A killed `ratplus-data prepare` leaves no tokenizer worker behind, and SIGTERM (Slurm's time
limit) cleans its staging directory up like any other error; after SIGKILL the staging directory
records an owner that is recognised as dead.

The input is a named pipe: prepare reads what the test writes, hands it to its two worker
processes, and then blocks reading more -- a deterministic moment, with the pool running, to
send the signal.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from megatron_ratplus.data import _owner
from megatron_ratplus.data.layout import OWNER_NAME, clear_abandoned_staging

from .conftest import SEQ_LEN, make_document

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_prepare_leaves_no_workers_and_sigterm_no_staging(tmp_path, dataset_dir, sig):
    fifo = tmp_path / "in.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    code = ("import sys; from megatron_ratplus.data.cli import main; sys.exit(main(sys.argv[1:]))")
    err_fh = open(tmp_path / "stderr", "w")  # not a pipe: orphaned workers would hold it open
    proc = subprocess.Popen([sys.executable, "-c", code, "prepare", str(fifo), "--output", str(out),
                             "--seq-len", str(SEQ_LEN), "--tokenizer", str(dataset_dir / "tokenizer.json"),
                             "--workers", "2"], stderr=err_fh)
    text = "".join(make_document(i, words=200) for i in range(3000))  # ~4.5 MB: a few 1 MiB pieces
    writer_fh = []

    def feed():  # keeps the pipe open after writing: prepare then waits for more input
        fh = open(fifo, "w")
        writer_fh.append(fh)
        fh.write(text)
        fh.flush()

    threading.Thread(target=feed, daemon=True).start()
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            workers = psutil.Process(proc.pid).children()
            time.sleep(0.1)
        assert len(workers) == 2, f"prepare did not start its 2 workers (rc={proc.poll()})"
        assert list(out.glob(".ratplus-staging-*"))
        time.sleep(1.0)                      # let prepare drain the pipe and block on it
        proc.send_signal(sig)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while not all(_gone(w.pid) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(w.pid) for w in workers), "tokenizer workers outlived the killed prepare"
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM, (tmp_path / "stderr").read_text()[-2000:]
            assert not list(out.glob(".ratplus-staging-*")) and not (out / "manifest.json").exists()
        else:  # SIGKILL runs no clean-up: the staging directory names its dead owner, and goes next time
            [staging] = out.glob(".ratplus-staging-*")
            owner = _owner.read_owner(staging / OWNER_NAME)
            assert owner["pid"] == proc.pid and _owner.owner_state(owner) == _owner.DEAD
            assert len(clear_abandoned_staging(out)) == 1 and not staging.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:
            if not _gone(w.pid):
                w.kill()
        for fh in writer_fh + [err_fh]:
            fh.close()
