"""``manifest.json`` of a prepared dataset: reading, writing, compatibility checks (shard verification:
``integrity``).

A dataset directory holds::

    manifest.json    this file (written last: a directory without it is not a finished dataset)
    tokenizer.json   the exact tokenizer used (its sha256 is in the manifest) -- export ships it
    train/           MDS shards (index.json + shard.NNNNN.mds[.zstd]) of packed samples
    val/             same, for the validation split

Each MDS sample has one column ``tokens``: ``ndarray:<dtype>:<seq_len + 1>``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import atomic_files

FORMAT = "megatron-ratplus/packed-tokens-mds"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
SPLITS = ("train", "val")
COLUMN = "tokens"
INDEX_NAME = "index.json"
REPLACED_DIR = ".ratplus-replaced"  # where a commit puts the dataset it replaces (see layout)


@dataclass(frozen=True)
class SplitInfo:
    documents: int
    tokens: int
    samples: int
    unused_tail_tokens: int
    shards: int
    content_xxh64: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SplitInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class DatasetManifest:
    """The parsed manifest; ``path`` is the dataset directory it was read from (if any)."""

    seq_len: int
    dtype: str
    vocab_size: int
    eos_id: int
    eos_token: str
    tokenizer_sha256: str
    compression: str | None
    hashes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    val_fraction: float
    inputs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    created_by: str = ""
    path: Path | None = None

    @property
    def sample_tokens(self) -> int:
        return self.seq_len + 1

    @property
    def tokenizer_path(self) -> Path | None:
        return None if self.path is None else self.path / TOKENIZER_NAME

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": self.created_by,
            "seq_len": self.seq_len,
            "sample_tokens": self.seq_len + 1,
            "column": COLUMN,
            "dtype": self.dtype,
            "packing": "documents joined by EOS; sample i = stream[i*seq_len : i*seq_len + seq_len + 1]",
            "tokenizer": {
                "file": TOKENIZER_NAME,
                "sha256": self.tokenizer_sha256,
                "vocab_size": self.vocab_size,
                "eos_id": self.eos_id,
                "eos_token": self.eos_token,
            },
            "compression": self.compression,
            "hashes": list(self.hashes),
            "val_fraction": self.val_fraction,
            "splits": {name: vars(info).copy() for name, info in self.splits.items()},
            "inputs": self.inputs,
            "params": self.params,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: Path | None = None) -> DatasetManifest:
        where = f" ({path / MANIFEST_NAME})" if path is not None else ""
        if d.get("format") != FORMAT:
            raise ValueError(f"not a megatron-ratplus dataset manifest{where}: format={d.get('format')!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format_version {d.get('format_version')!r}{where}; "
                             f"this version reads {FORMAT_VERSION}")
        try:
            tok = d["tokenizer"]
            return cls(
                seq_len=int(d["seq_len"]),
                dtype=str(d["dtype"]),
                vocab_size=int(tok["vocab_size"]),
                eos_id=int(tok["eos_id"]),
                eos_token=str(tok["eos_token"]),
                tokenizer_sha256=str(tok["sha256"]),
                compression=d.get("compression"),
                hashes=tuple(d.get("hashes", ())),
                splits={k: SplitInfo.from_dict(v) for k, v in d["splits"].items()},
                val_fraction=float(d["val_fraction"]),
                inputs=dict(d.get("inputs", {})),
                params=dict(d.get("params", {})),
                created_by=str(d.get("created_by", "")),
                path=path,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed dataset manifest{where}: {exc!r}") from exc


def write_manifest(directory: str | os.PathLike, manifest: DatasetManifest) -> Path:
    return atomic_files.replace_text(Path(directory) / MANIFEST_NAME,
                                     json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n")


def read_manifest(directory: str | os.PathLike) -> DatasetManifest:
    """Read ``<directory>/manifest.json``. Raises FileNotFoundError / ValueError naming the problem."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        if not directory.exists():
            raise FileNotFoundError(f"dataset directory {directory} does not exist")
        if (directory / REPLACED_DIR).is_dir():
            raise FileNotFoundError(
                f"{directory} has no {MANIFEST_NAME}: a `ratplus-data prepare` was killed while it replaced the "
                f"dataset there; the previous dataset is in {directory / REPLACED_DIR} and the next "
                f"`ratplus-data prepare --output {directory}` puts it back first")
        raise FileNotFoundError(
            f"{directory} has no {MANIFEST_NAME}: not a dataset prepared by `ratplus-data prepare` "
            f"(or its preparation did not finish)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    return DatasetManifest.from_dict(data, path=directory)


def check_manifest_compat(manifest: DatasetManifest | Mapping[str, Any] | str | os.PathLike, *,
                          vocab_size: int, seq_len: int) -> DatasetManifest:
    """Check that a dataset can feed a model with ``vocab_size`` (padded vocab allowed) and ``seq_len``.

    The model's (possibly padded) vocabulary may be larger than the tokenizer's; a tokenizer
    vocabulary larger than the model's, or a different sequence length, is a ValueError naming both
    values. Accepts a manifest, its dict, or a dataset directory. Returns the manifest.
    """
    if isinstance(manifest, (str, os.PathLike)):
        manifest = read_manifest(manifest)
    elif isinstance(manifest, Mapping):
        manifest = DatasetManifest.from_dict(manifest)
    where = f"dataset {manifest.path}" if manifest.path is not None else "dataset"
    problems = []
    if manifest.vocab_size > vocab_size:
        problems.append(
            f"its tokenizer has {manifest.vocab_size} tokens (sha256 {manifest.tokenizer_sha256[:12]}) "
            f"but the model's vocab_size is {vocab_size}: token ids up to {manifest.vocab_size - 1} "
            f"would index past the embedding (set the model vocab_size >= {manifest.vocab_size})"
        )
    if manifest.seq_len != seq_len:
        problems.append(
            f"it was packed for seq_len {manifest.seq_len} (samples of {manifest.seq_len + 1} tokens) "
            f"but the model config has seq_len {seq_len} (re-run `ratplus-data prepare --seq-len {seq_len}`)"
        )
    if problems:
        raise ValueError(f"{where} does not match the model config: " + "; ".join(problems))
    return manifest

