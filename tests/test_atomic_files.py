"""A file replaced through atomic_files holds the old content or the new, never a part, and no temporary is left."""
import os
import stat

import pytest

from megatron_ratplus import atomic_files


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


@pytest.mark.parametrize("durable", [False, True])
def test_replace_text_writes_the_whole_text_and_leaves_no_temporary(tmp_path, durable):
    path = tmp_path / "latest.txt"
    path.write_text("old\n")
    assert atomic_files.replace_text(path, "new ü\n", durable=durable) == path
    assert path.read_text(encoding="utf-8") == "new ü\n"
    assert _leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text("{\"old\": 1}\n")
    real_fsync = os.fsync

    def failing_fsync(fd):
        real_fsync(fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_files.replace_text(path, "{\"new\": 2}\n", durable=True)
    assert path.read_text() == "{\"old\": 1}\n"
    assert _leftovers(tmp_path) == []


def test_permissions_follow_the_umask_as_a_plain_open_would(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_files.replace_text(tmp_path / "owner.json", "{}")
    finally:
        os.umask(old)
    # group and others may read (a shared project directory), as with open(path, "w")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_temporary_sibling_is_hidden_beside_the_target(tmp_path):
    tmp = atomic_files.temporary_sibling(tmp_path / "latest_checkpointed_iteration.txt")
    assert tmp.parent == tmp_path
    assert tmp.name == f".latest_checkpointed_iteration.txt.tmp.{os.getpid()}"
