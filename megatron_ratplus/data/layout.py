"""The files a dataset directory owns, refusing to clobber, and replacing a dataset safely.

A new dataset is written into a staging directory inside the output directory and moved into
place only once complete (manifest last), so a failed preparation leaves the output untouched and
``--overwrite`` deletes the old dataset's files only after the new one is ready. Only files the old
dataset owns are ever deleted: its manifest, tokenizer.json, each split's index.json and the shard
files that index lists (compressed, decompressed, and streaming's temporary ``.tmp`` forms).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from .manifest import INDEX_NAME, MANIFEST_NAME, SPLITS, TOKENIZER_NAME, read_manifest

STAGING_PREFIX = ".ratplus-staging-"


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
    if (directory / MANIFEST_NAME).is_file():
        manifest = read_manifest(directory)  # must be ours to know what it owns
        if not overwrite:
            counts = ", ".join(f"{k}: {v.samples} samples" for k, v in manifest.splits.items())
            raise FileExistsError(
                f"output {directory} already holds a dataset ({counts}; seq_len {manifest.seq_len}); "
                f"pass --overwrite (overwrite=True) to replace it -- only that dataset's own files are deleted"
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


def new_staging_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def remove_dataset(directory: Path) -> None:
    """Delete the files owned by the dataset in ``directory`` (manifest first), nothing else."""
    files = owned_files(directory)
    files.sort(key=lambda p: p.name != MANIFEST_NAME)  # manifest first: never a manifest without data
    for f in files:
        f.unlink()
    for split in SPLITS:
        d = directory / split
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def commit_staging(staging: Path, directory: Path, *, replace_existing: bool) -> None:
    """Move a complete dataset from ``staging`` into ``directory`` (manifest last)."""
    if replace_existing:
        remove_dataset(directory)
    for split in SPLITS:
        src = staging / split
        if not src.is_dir():
            continue
        dst = directory / split
        dst.mkdir(exist_ok=True)
        names = sorted(p.name for p in src.iterdir())
        names.sort(key=lambda n: n == INDEX_NAME)  # index after its shards
        for name in names:
            os.replace(src / name, dst / name)
        src.rmdir()
    os.replace(staging / TOKENIZER_NAME, directory / TOKENIZER_NAME)
    os.replace(staging / MANIFEST_NAME, directory / MANIFEST_NAME)
    shutil.rmtree(staging)


def discard_staging(staging: Path) -> None:
    if staging.name.startswith(STAGING_PREFIX) and staging.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
