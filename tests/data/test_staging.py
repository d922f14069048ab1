"""Staging directories left by a killed `prepare` (SIGKILL runs no clean-up): the next preparation
into the directory removes those whose owner has exited, refuses to run beside a live one, and
leaves those it cannot judge -- never touching the committed dataset."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest

from megatron_ratplus.data import _owner, prepare_dataset
from megatron_ratplus.data.layout import OWNER_NAME, STAGING_PREFIX, new_staging_dir

from .conftest import SEQ_LEN


def exited_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def staging_with(out, name: str, owner: dict | None):
    d = out / f"{STAGING_PREFIX}{name}"
    (d / "train").mkdir(parents=True)
    (d / "train" / "shard.00000.mds").write_bytes(b"half-written")
    if owner is not None:
        (d / OWNER_NAME).write_text(json.dumps(owner))
    return d


def prep(out, dataset_dir, corpus_dir, logs=None, **kw):
    return prepare_dataset([corpus_dir / "b_records.jsonl"], out, seq_len=SEQ_LEN, workers=1, val_fraction=0.2,
                           tokenizer=dataset_dir / "tokenizer.json", log=None if logs is None else logs.append, **kw)


def files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*")
            if p.is_file() and STAGING_PREFIX not in p.as_posix()}


def test_staging_records_its_owner(tmp_path):
    staging = new_staging_dir(tmp_path / "out")
    owner = _owner.read_owner(staging / OWNER_NAME)
    assert owner["pid"] == os.getpid() and _owner.owner_state(owner) == _owner.ALIVE
    # the pid alone is not trusted: a reused pid (another start time) or a reboot means the owner is gone
    assert _owner.owner_state({**owner, "start_ticks": owner["start_ticks"] + 1}) == _owner.DEAD
    assert _owner.owner_state({**owner, "boot_id": "another-boot"}) == _owner.DEAD
    assert _owner.owner_state({**owner, "pid": exited_pid()}) == _owner.DEAD
    assert _owner.owner_state({**owner, "host": "elsewhere"}) == _owner.UNKNOWN
    # another container of this machine (same host name and boot): its pids are not ours to look up
    assert _owner.owner_state({**owner, "pid": exited_pid(), "pid_namespace": "pid:[1]"}) == _owner.UNKNOWN


def test_abandoned_staging_is_removed_and_unknown_ones_are_left(tmp_path, dataset_dir, corpus_dir):
    out = tmp_path / "ds"
    shutil.copytree(dataset_dir, out, ignore=shutil.ignore_patterns("*.mds"))
    committed = files(out)
    mine = _owner.current_owner()
    dead = staging_with(out, "dead", {**mine, "pid": exited_pid()})
    remote = staging_with(out, "remote", {**mine, "host": "elsewhere"})
    legacy = staging_with(out, "legacy", None)
    logs: list[str] = []
    with pytest.warns(RuntimeWarning) as caught, pytest.raises(FileExistsError, match="already holds a dataset"):
        prep(out, dataset_dir, corpus_dir, logs)  # no --overwrite: refused, after the clean-up
    assert not dead.exists() and remote.is_dir() and legacy.is_dir()
    assert len(logs) == 1 and f"removed {dead}" in logs[0] and "no longer runs" in logs[0]
    left = [str(w.message) for w in caught if "is left in place" in str(w.message)]
    assert len(left) == 2
    assert any(f"{remote} is left in place: its owner (pid" in m and "ran on another host" in m for m in left)
    assert any(f"{legacy} is left in place: it records no owner" in m for m in left)
    assert files(out) == committed
    # a real preparation afterwards: its own staging directory goes, the ones it cannot judge stay
    shutil.rmtree(legacy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep(out, dataset_dir, corpus_dir, overwrite=True)
    assert sorted(p.name for p in out.glob(f"{STAGING_PREFIX}*")) == [remote.name]


def test_live_owner_is_left_alone(tmp_path, dataset_dir, corpus_dir):
    out = tmp_path / "ds"
    live = staging_with(out, "live", _owner.current_owner())
    with pytest.raises(FileExistsError, match=rf"another `ratplus-data prepare` is writing into {out} "
                                              rf"\(pid {os.getpid()} on .*staging directory {live.name}"):
        prep(out, dataset_dir, corpus_dir)
    assert (live / "train" / "shard.00000.mds").read_bytes() == b"half-written"
    assert sorted(p.name for p in out.iterdir()) == [live.name]


def test_a_second_preparation_starting_beside_a_running_one_is_refused(tmp_path, dataset_dir, corpus_dir):
    """Two preparations that start at the same instant both find no staging directory; the lock on the
    output directory, held for the whole run, refuses the second. A failure before anything was
    written leaves no output directory behind."""
    import fcntl
    out = tmp_path / "ds"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # another process's preparation, in effect
        code = ("import sys; from megatron_ratplus.data import prepare_dataset\n"
                "try:\n"
                f"    prepare_dataset([{str(corpus_dir / 'b_records.jsonl')!r}], {str(out)!r}, seq_len={SEQ_LEN}, "
                f"workers=1, tokenizer={str(dataset_dir / 'tokenizer.json')!r})\n"
                "except FileExistsError as e:\n"
                "    print(e); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 3, proc.stderr
        assert f"another `ratplus-data prepare` is writing into {out}" in proc.stdout
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)
    prep(out, dataset_dir, corpus_dir)                    # once released
    missing = tmp_path / "never"
    with pytest.raises(ValueError, match="seq_len"):
        prepare_dataset([corpus_dir / "b_records.jsonl"], missing, seq_len=0, workers=1,
                        tokenizer=dataset_dir / "tokenizer.json")
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-tokenizer"):   # after the lock
        prepare_dataset([corpus_dir / "b_records.jsonl"], missing, seq_len=SEQ_LEN, workers=1,
                        tokenizer=tmp_path / "no-such-tokenizer.json")
    assert not missing.exists()
