"""Shard integrity: the hashes that MDSWriter records in each split's ``index.json``, checked.

``prepare`` has streaming's MDSWriter record the sha1 and xxh64 of every shard file (raw and
compressed) in ``index.json``; xxh64 is the one checked (it hashes at memory speed, several
times faster than sha1). The checks:

- ``ratplus-data validate DIR`` (:func:`verify_shards`) reads every shard file present in full and
  names each damaged one: a flipped byte (same size) by its hash, a truncated file by its size.
- At run time streaming checks a shard whenever it decompresses or downloads it
  (``Stream(validate_hash=...)``, :func:`stream_hash`): that is where bytes come through a copy or
  a network, and the bytes are being read anyway, so the check costs only the hashing.
- Raw ``.mds`` files read in place (``--compression none``, or zstd shards already decompressed)
  are not re-hashed by default: doing so at every start would read the whole split on every
  (re)start, on every reader of a node -- minutes for a large dataset, on the job's critical path
  -- to guard against damage at rest that one ``ratplus-data validate`` after copying a dataset
  catches. ``build_pretraining_loader(verify_shards=True)`` opts in to that check at start.

A dataset whose index records no hash (written without ``hashes=``) still loads and validates: its
files are checked for size only, and validate says so.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import INDEX_NAME, TOKENIZER_NAME, DatasetManifest, read_manifest

PREFERRED_HASHES = ("xxh64", "sha1")  # fastest first
_CHUNK = 1 << 22


@dataclass
class ShardCheck:
    """What :func:`verify_shards` found: ``problems`` (one line each, naming the file) and the
    number of files compared by each hash algorithm or, without a recorded hash, by size only."""

    problems: list[str] = field(default_factory=list)
    hashed: dict[str, int] = field(default_factory=dict)
    size_only: int = 0

    @property
    def files(self) -> int:
        return sum(self.hashed.values()) + self.size_only


def preferred_hash(recorded) -> str | None:
    """Of the hash algorithms ``recorded``, the one to check: the fastest of PREFERRED_HASHES, else
    any other recorded one (a dataset written by other tools), else None."""
    recorded = list(recorded)
    return next((a for a in PREFERRED_HASHES if a in recorded), next(iter(sorted(recorded)), None))


def stream_hash(manifest: DatasetManifest) -> str | None:
    """The algorithm streaming should validate this dataset's shards with (None: none recorded)."""
    return preferred_hash(manifest.hashes)


def file_digest(path: Path, algo: str) -> str:
    """Hex digest of a file, as streaming's ``get_hash`` computes it, read in chunks."""
    if algo == "xxh64":
        import xxhash

        digest = xxhash.xxh64()
    elif algo in hashlib.algorithms_available:
        digest = hashlib.new(algo)
    else:  # another of streaming's algorithms: whole-file
        from streaming.base.hashing import get_hash

        return get_hash(algo, path.read_bytes())
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(file: Path, meta: dict, index_path: Path, check: ShardCheck) -> None:
    size = file.stat().st_size
    if size != meta["bytes"]:
        check.problems.append(f"{file}: corrupt: {size} bytes where {index_path} records {meta['bytes']} "
                              f"(truncated or overwritten)")
        return
    hashes = meta.get("hashes") or {}
    algo = preferred_hash(hashes)
    if algo is None:
        check.size_only += 1
        return
    check.hashed[algo] = check.hashed.get(algo, 0) + 1
    if file_digest(file, algo) != hashes[algo]:
        check.problems.append(f"{file}: corrupt: its {algo} does not match {index_path} (same size: bytes "
                              f"damaged after `ratplus-data prepare` wrote it)")


def verify_split(directory: str | os.PathLike, split: str, check: ShardCheck | None = None,
                 expected_samples: int | None = None) -> ShardCheck:
    """Check the shard files of one split that are present (raw, compressed, or both) against its
    ``index.json``; a shard with neither file is a problem. Adds to ``check``; returns it."""
    check = ShardCheck() if check is None else check
    index_path = Path(directory) / split / INDEX_NAME
    if not index_path.is_file():
        check.problems.append(f"{index_path}: missing")
        return check
    try:
        shards = json.loads(index_path.read_text())["shards"]
    except (ValueError, KeyError, TypeError) as e:
        check.problems.append(f"{index_path}: not valid JSON ({e})" if isinstance(e, ValueError)
                              else f"{index_path}: not a shard index (no 'shards' list)")
        return check
    samples = 0
    for shard in shards:
        samples += shard["samples"]
        metas = [m for m in (shard.get("raw_data"), shard.get("zip_data")) if m]
        present = [(index_path.parent / m["basename"], m) for m in metas
                   if (index_path.parent / m["basename"]).is_file()]
        if not present:
            names = " / ".join(m["basename"] for m in metas)
            check.problems.append(f"{index_path.parent}/{names}: missing (neither the raw nor the compressed file)")
        for file, meta in present:
            _check_file(file, meta, index_path, check)
    if expected_samples is not None and samples != expected_samples:
        check.problems.append(f"{index_path}: {samples} samples but the manifest says {expected_samples}")
    return check


def verify_shards(directory: str | os.PathLike) -> ShardCheck:
    """Check every shard file of the dataset in ``directory`` against the sizes and hashes in its
    splits' ``index.json``, and ``tokenizer.json`` against the manifest's sha256. Reads all the data."""
    from .tokenizer import file_sha256

    directory = Path(directory)
    manifest = read_manifest(directory)
    check = ShardCheck()
    for split, info in manifest.splits.items():
        verify_split(directory, split, check, expected_samples=info.samples)
    tok = directory / TOKENIZER_NAME
    if not tok.is_file():
        check.problems.append(f"{tok}: missing")
    elif file_sha256(tok) != manifest.tokenizer_sha256:
        check.problems.append(f"{tok}: its sha256 does not match the manifest's (not the tokenizer the dataset "
                              f"was prepared with)")
    return check


def verify_dataset(directory: str | os.PathLike) -> list[str]:
    """The problems :func:`verify_shards` finds (empty when everything matches)."""
    return verify_shards(directory).problems
