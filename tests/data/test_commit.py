"""Replacing a dataset (`prepare --overwrite`) never leaves the directory without a complete one.

The commit is interrupted at each of its file moves in turn -- by an exception (the commit puts
the old dataset back before it propagates) and by a simulated kill (no clean-up runs; the next
preparation into the directory recovers first): afterwards the directory holds exactly the old
dataset or exactly the new one, every shard verified.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

from megatron_ratplus.data import layout, prepare_dataset, read_manifest, verify_dataset
from megatron_ratplus.data.layout import STAGING_PREFIX, check_output_dir, commit_staging, owned_files
from megatron_ratplus.data.manifest import REPLACED_DIR

from .conftest import SEQ_LEN


class Killed(BaseException):
    """Stands for the process dying: nothing catches it."""


@pytest.fixture(scope="module")
def old_and_new(tmp_path_factory, corpus_dir, dataset_dir):
    """Two datasets with overlapping file names: the old one zstd with a val split, the new one
    uncompressed with more shards and no val split."""
    root = tmp_path_factory.mktemp("commit")
    tok = dataset_dir / "tokenizer.json"
    prepare_dataset([corpus_dir / "b_records.jsonl"], root / "old", seq_len=SEQ_LEN, tokenizer=tok,
                    val_fraction=0.2, workers=1, shard_size=3000)
    prepare_dataset(sorted(corpus_dir.glob("a_*.txt"))[:12], root / "new", seq_len=SEQ_LEN, tokenizer=tok,
                    val_fraction=0, workers=1, shard_size=2000, compression=None)
    return root / "old", root / "new"


def snapshot(directory: Path) -> dict:
    """The dataset in ``directory`` as {relative path: bytes} of the files it owns."""
    return {str(f.relative_to(directory)): f.read_bytes() for f in owned_files(directory)}


def setup(tmp_path: Path, old: Path, new: Path) -> tuple[Path, Path]:
    out = tmp_path / "ds"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(old, out)
    staging = out / f"{STAGING_PREFIX}test"
    shutil.copytree(new, staging)
    return out, staging


def failing_replace(k: int, exc: type[BaseException]):
    real, calls = os.replace, [0]

    def replace(src, dst):
        calls[0] += 1
        if calls[0] == k:
            raise exc(f"simulated failure at move {k}")
        return real(src, dst)

    return replace, calls


def assert_one_complete(out: Path, old_files: dict, new_files: dict) -> str:
    files = snapshot(out)
    assert files in (old_files, new_files), "neither the old nor the new dataset is complete"
    assert verify_dataset(out) == [] and not (out / REPLACED_DIR).exists()
    return "old" if files == old_files else "new"


def test_interrupted_overwrite_keeps_one_complete_dataset(tmp_path, old_and_new, monkeypatch):
    old, new = old_and_new
    old_files, new_files = snapshot(old), snapshot(new)
    out, staging = setup(tmp_path, old, new)
    counting, calls = failing_replace(0, OSError)
    monkeypatch.setattr(os, "replace", counting)
    commit_staging(staging, out, replace_existing=True)
    monkeypatch.undo()
    moves = calls[0]
    assert moves == len(old_files) + len(new_files) and assert_one_complete(out, old_files, new_files) == "new"
    assert not (out / "val").exists() and not staging.exists()

    outcomes = set()
    for k in range(1, moves + 1):
        # an error: the commit undoes itself before raising
        out, staging = setup(tmp_path, old, new)
        monkeypatch.setattr(os, "replace", failing_replace(k, OSError)[0])
        with pytest.raises(OSError, match=f"simulated failure at move {k}"):
            commit_staging(staging, out, replace_existing=True)
        monkeypatch.undo()
        assert assert_one_complete(out, old_files, new_files) == "old"

        # a kill: nothing runs; the directory reads as a complete dataset or names the way back
        out, staging = setup(tmp_path, old, new)
        monkeypatch.setattr(os, "replace", failing_replace(k, Killed)[0])
        monkeypatch.setattr(layout, "recover_interrupted_commit", lambda directory: None)
        with pytest.raises(Killed):
            commit_staging(staging, out, replace_existing=True)
        monkeypatch.undo()
        try:
            read_manifest(out)
        except FileNotFoundError as e:
            assert f"the previous dataset is in {out / REPLACED_DIR}" in str(e)
        restores = not (out / "manifest.json").exists()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_output_dir(out, overwrite=True)  # what the next `prepare --overwrite` does first
        outcomes.add(assert_one_complete(out, old_files, new_files))
        assert len(caught) == restores and (not restores or "previous dataset was put back" in str(caught[0].message))
    assert outcomes == {"old"}  # the new manifest moves last: until then the old dataset comes back

    # killed after the last move, while deleting the old files: the new dataset is complete
    out, staging = setup(tmp_path, old, new)
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: (_ for _ in ()).throw(Killed()))
    monkeypatch.setattr(layout, "recover_interrupted_commit", lambda directory: None)
    with pytest.raises(Killed):
        commit_staging(staging, out, replace_existing=True)
    monkeypatch.undo()
    assert snapshot(out) == new_files and (out / REPLACED_DIR).is_dir()
    check_output_dir(out, overwrite=True)
    assert assert_one_complete(out, old_files, new_files) == "new"


def test_prepare_recovers_a_killed_overwrite_before_its_checks(tmp_path, old_and_new, corpus_dir, dataset_dir,
                                                               monkeypatch):
    old, new = old_and_new
    out, staging = setup(tmp_path, old, new)
    monkeypatch.setattr(os, "replace", failing_replace(len(snapshot(old)) + 2, Killed)[0])
    monkeypatch.setattr(layout, "recover_interrupted_commit", lambda directory: None)
    with pytest.raises(Killed):
        commit_staging(staging, out, replace_existing=True)
    monkeypatch.undo()
    assert json.loads((out / REPLACED_DIR / "incoming.json").read_text())  # killed while moving the new files in
    with pytest.warns(RuntimeWarning, match="the previous dataset was put back"), \
            pytest.raises(FileExistsError, match="already holds a dataset"):
        prepare_dataset([corpus_dir / "b_records.jsonl"], out, seq_len=SEQ_LEN,
                        tokenizer=dataset_dir / "tokenizer.json", workers=1)
    assert snapshot(out) == snapshot(old)


def test_a_recovery_killed_part_way_is_recovered_again(tmp_path, old_and_new, monkeypatch):
    """A kill while a recovery moves the old files back (the old manifest moves last) leaves a directory
    that the next recovery still puts back together: never a manifest over a partial dataset."""
    old, new = old_and_new
    old_files, new_files = snapshot(old), snapshot(new)
    moves_back = len(old_files)
    for k in range(1, moves_back + 1):
        out, staging = setup(tmp_path, old, new)
        # killed while moving the new files in: the old ones are all aside
        monkeypatch.setattr(os, "replace", failing_replace(moves_back + 2, Killed)[0])
        monkeypatch.setattr(layout, "recover_interrupted_commit", lambda directory: None)
        with pytest.raises(Killed):
            commit_staging(staging, out, replace_existing=True)
        monkeypatch.undo()
        # the next preparation's recovery is killed at its k-th move back
        monkeypatch.setattr(os, "replace", failing_replace(k, Killed)[0])
        with pytest.raises(Killed):
            layout.recover_interrupted_commit(out)
        monkeypatch.undo()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_output_dir(out, overwrite=True)
        assert assert_one_complete(out, old_files, new_files) == "old"
