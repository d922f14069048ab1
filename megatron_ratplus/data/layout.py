"""The files a dataset directory owns, refusing to clobber, and replacing a dataset safely.

A new dataset is written into a staging directory inside the output directory and moved into
place only once complete (manifest last), so a failed preparation leaves the output untouched.
Only files the old dataset owns are ever touched: its manifest, tokenizer.json, each split's
index.json and the shard files that index lists (compressed, decompressed, and streaming's
temporary ``.tmp`` forms).

Commit (:func:`commit_staging`). The old dataset's files first move aside into ``REPLACED_DIR``
inside the dataset directory (manifest first), then a journal listing the new files is written
there, the new files move in (manifest last), and the aside directory is deleted. A manifest in
the dataset directory therefore always belongs to a complete dataset, and a commit that stops
part-way is undone -- at once when it raises, else (the process was killed) by the next
``prepare`` into that directory (:func:`recover_interrupted_commit`): without a manifest, the
journal's files are deleted and the old dataset moves back (manifest last, so a crash while
recovering is recovered again); with a manifest, the commit had finished and the aside directory
is stale.

Staging directories. Each records its owner (``.owner.json``: pid, host, boot id, process start
time; see ``_owner``). A ``prepare`` killed by SIGKILL (or the OOM killer) cannot remove its own, so
the next ``prepare`` into the directory does (:func:`clear_abandoned_staging`, before any other
check or recovery): one whose owner has certainly exited is deleted; one whose owner still runs
means a concurrent preparation into the same directory, which is refused (the two commits would
interleave, and recovery would undo the other's commit in progress); one whose owner cannot be told
(another host, or no record) is left with a warning naming it.

One preparation at a time. The staging check above cannot see a second ``prepare`` that starts at
the same instant as the first (neither has a staging directory yet), so each also holds an flock on
the output directory itself for its whole run (:func:`lock_output_dir`,
:mod:`megatron_ratplus.file_locks`: the lock ends with the process, however it ends, and the
tokenizer workers it forks do not keep it).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

from .. import file_locks
from . import _owner
from .manifest import INDEX_NAME, MANIFEST_NAME, REPLACED_DIR, SPLITS, TOKENIZER_NAME, read_manifest

STAGING_PREFIX = ".ratplus-staging-"
JOURNAL_NAME = "incoming.json"
OWNER_NAME = ".owner.json"  # in a staging directory: the preparing process (see _owner)


def owned_files(directory: Path) -> list[Path]:
    """Existing files that belong to the dataset in ``directory`` (manifest and index listed)."""
    out = []
    for name in (MANIFEST_NAME, TOKENIZER_NAME):
        if (directory / name).is_file():
            out.append(directory / name)
    for split in SPLITS:
        index = directory / split / INDEX_NAME
        if not index.is_file():
            continue
        try:
            shards = json.loads(index.read_text())["shards"]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{index} is unreadable ({exc!r}); cannot tell which files the dataset owns") from exc
        for shard in shards:
            for key in ("raw_data", "zip_data"):
                meta = shard.get(key)
                if meta:
                    for name in (meta["basename"], meta["basename"] + ".tmp"):
                        if (directory / split / name).is_file():
                            out.append(directory / split / name)
        out.append(index)
    return out


def check_output_dir(directory: str | os.PathLike, *, overwrite: bool) -> bool:
    """Raise FileExistsError if writing a dataset to ``directory`` would clobber something.

    Returns True when an existing ratplus dataset is there and ``overwrite`` allows replacing it.
    Unrelated files in the directory are left alone and do not block preparation.
    """
    directory = Path(directory)
    if not directory.exists():
        return False
    if not directory.is_dir():
        raise FileExistsError(f"output {directory} exists and is not a directory")
    recover_interrupted_commit(directory)
    if (directory / MANIFEST_NAME).is_file():
        manifest = read_manifest(directory)  # must be ours to know what it owns
        if not overwrite:
            counts = ", ".join(f"{k}: {v.samples} samples" for k, v in manifest.splits.items())
            raise FileExistsError(
                f"output {directory} already holds a dataset ({counts}; seq_len {manifest.seq_len}); "
                f"pass --overwrite (overwrite=True from Python) to replace it -- only that dataset's own files are deleted"
            )
        owned_files(directory)  # raises if an index is unreadable: we would not know what to delete
        return True
    for rel in (INDEX_NAME, *(f"{s}/{INDEX_NAME}" for s in SPLITS)):
        if (directory / rel).exists():
            raise FileExistsError(
                f"output {directory} holds MDS data ({rel}) that was not written by ratplus-data "
                f"(no {MANIFEST_NAME}); refusing to touch it, even with --overwrite: choose another directory"
            )
    if (directory / TOKENIZER_NAME).exists():
        raise FileExistsError(f"output {directory} already has a {TOKENIZER_NAME} that is not part of a "
                              f"ratplus dataset; refusing to overwrite it")
    for split in SPLITS:
        d = directory / split
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise FileExistsError(f"output {directory} already has a non-empty {split}/ that is not part of a "
                                  f"ratplus dataset; refusing to write into it")
    return False


def lock_output_dir(directory: Path):
    """Take an exclusive flock on ``directory`` (created if missing) for one preparation; returns the
    function that releases it (and removes the directory again if this call created it and it is
    still empty). FileExistsError if another process holds it. On a file system without flock on
    directories (some NFS set-ups) the preparation runs unlocked, with a warning."""
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)

    def release() -> None:
        file_locks.release(fd)
        if created:
            try:
                directory.rmdir()       # only when empty: a failure before anything was written
            except OSError:
                pass

    try:
        held = file_locks.try_lock(fd)
    except OSError as e:
        warnings.warn(f"cannot lock {directory} ({e}): nothing stops a second `ratplus-data prepare` into it "
                      f"meanwhile", RuntimeWarning, stacklevel=2)
        return release
    if not held:
        os.close(fd)
        raise FileExistsError(f"another `ratplus-data prepare` is writing into {directory} (it holds the "
                              f"directory's lock); wait for it to finish or stop it")
    return release


def new_staging_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    _owner.write_owner(staging / OWNER_NAME)
    return staging


def clear_abandoned_staging(directory: Path) -> list[str]:
    """Delete the staging directories in ``directory`` whose preparing process has exited (see the
    module docstring); returns one line per deleted directory. FileExistsError if a live process
    is preparing into ``directory``; a RuntimeWarning for each one left because its owner is unknown.
    """
    removed = []
    for staging in sorted(directory.glob(f"{STAGING_PREFIX}*")) if directory.is_dir() else []:
        if not staging.is_dir():
            continue
        owner = _owner.read_owner(staging / OWNER_NAME)
        state = _owner.owner_state(owner) if owner is not None else _owner.UNKNOWN
        if state == _owner.DEAD:
            shutil.rmtree(staging)
            removed.append(f"removed {staging}: left by a `ratplus-data prepare` that no longer runs "
                           f"({_owner.describe(owner)})")
        elif state == _owner.ALIVE:
            raise FileExistsError(
                f"another `ratplus-data prepare` is writing into {directory} ({_owner.describe(owner)}; staging "
                f"directory {staging.name}); wait for it to finish or stop it -- its files are left alone")
        else:
            who = (f"its owner ({_owner.describe(owner)}) ran on another host or in another container"
                   if owner is not None else f"it records no owner ({OWNER_NAME})")
            warnings.warn(f"{staging} is left in place: {who}, so whether that preparation still runs cannot "
                          f"be told from here; delete the directory once it is not running", RuntimeWarning,
                          stacklevel=2)
    return removed


def commit_staging(staging: Path, directory: Path, *, replace_existing: bool) -> None:
    """Move a complete dataset from ``staging`` into ``directory``, the old one aside first (see the
    module docstring); on any error the old dataset is put back before the error propagates."""
    aside = directory / REPLACED_DIR
    if aside.exists():
        raise FileExistsError(f"{aside} exists: an earlier commit into {directory} was not cleaned up")
    old = owned_files(directory) if replace_existing else []
    old.sort(key=lambda p: p.name != MANIFEST_NAME)  # manifest first: never a manifest without data
    new = [p.relative_to(staging) for split in SPLITS if (staging / split).is_dir()
           for p in sorted((staging / split).iterdir(), key=lambda p: (p.name == INDEX_NAME, p.name))]
    new += [Path(TOKENIZER_NAME), Path(MANIFEST_NAME)]  # indexes after their shards, manifest last
    try:
        aside.mkdir()
        for f in old:
            _move(f, aside / f.relative_to(directory))
        (aside / JOURNAL_NAME).write_text(json.dumps([str(rel) for rel in new]))
        for rel in new:
            _move(staging / rel, directory / rel)
        shutil.rmtree(aside)
    except BaseException:
        recover_interrupted_commit(directory)
        raise
    _remove_empty_split_dirs(directory)  # a split the new dataset lacks
    shutil.rmtree(staging)


def recover_interrupted_commit(directory: Path) -> None:
    """Finish or undo a commit into ``directory`` that stopped part-way (see the module docstring)."""
    aside = directory / REPLACED_DIR
    if not aside.is_dir():
        return
    if (directory / MANIFEST_NAME).is_file():  # not started, or finished: the directory is complete
        shutil.rmtree(aside)
        return
    journal = aside / JOURNAL_NAME
    try:
        incoming = json.loads(journal.read_text())
    except (OSError, ValueError):  # none (or half-written): no new file had moved in yet
        incoming = []
    for rel in incoming:
        (directory / rel).unlink(missing_ok=True)
    journal.unlink(missing_ok=True)
    old = sorted((p for p in aside.rglob("*") if p.is_file()), key=lambda p: p.name == MANIFEST_NAME)
    for f in old:
        _move(f, directory / f.relative_to(aside))
    _remove_empty_split_dirs(directory)
    shutil.rmtree(aside)
    if old:
        warnings.warn(f"{directory}: a `ratplus-data prepare` stopped while it replaced the dataset there; the "
                      f"previous dataset was put back", RuntimeWarning, stacklevel=2)


def _remove_empty_split_dirs(directory: Path) -> None:
    for split in SPLITS:
        d = directory / split
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(exist_ok=True)
    os.replace(src, dst)


def discard_staging(staging: Path) -> None:
    if staging.name.startswith(STAGING_PREFIX) and staging.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
