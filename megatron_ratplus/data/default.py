"""``prepare_default_dataset``: the demo dataset from the embedded default corpus, idempotently.

The corpus (``corpus``) is tokenised with a byte-level BPE trained on the corpus itself. Calling
again with the same parameters on the same machine reuses the directory; a directory holding any
other dataset is an error (it is never overwritten).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .corpus import select_default_corpus
from .manifest import INDEX_NAME, MANIFEST_NAME, SPLITS, read_manifest
from .prepare import default_workers, prepare_dataset

DEFAULT_VAL_FRACTION = 0.05


def _params(*, seq_len: int, vocab_size: int, size_mb: float, seed: int, val_fraction: float, corpus: dict) -> dict:
    return {
        "kind": "default-corpus",
        "seq_len": int(seq_len),
        "vocab_size": int(vocab_size),
        "size_mb": float(size_mb),
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "corpus": corpus,
    }


def _diff(existing: dict, wanted: dict) -> list[str]:
    keys = sorted(set(existing) | set(wanted))
    return [f"{k}: existing {existing.get(k)!r} vs requested {wanted.get(k)!r}"
            for k in keys if existing.get(k) != wanted.get(k)]


def _complete(directory: Path, manifest) -> bool:
    return (directory / "tokenizer.json").is_file() and all(
        (directory / s / INDEX_NAME).is_file() for s in manifest.splits if s in SPLITS)


def prepare_default_dataset(
    output_dir: str | os.PathLike,
    *,
    seq_len: int,
    vocab_size: int,
    size_mb: float = 3.0,
    seed: int = 1234,
    workers: int | None = None,
    val_fraction: float | None = None,
    log=None,
) -> Path:
    """Prepare (or reuse) the default-corpus dataset in ``output_dir``; returns the directory.

    ``val_fraction`` defaults to 5% of the documents (files), at least two documents.
    The dataset is reused when ``output_dir`` already holds one prepared with the same
    ``seq_len``, ``vocab_size``, ``size_mb``, ``seed``, ``val_fraction`` and the same corpus files
    (fingerprint); a different dataset there raises ValueError listing the differences.
    Concurrent callers on one machine are serialised with a file lock.
    """
    from filelock import FileLock

    output = Path(output_dir).resolve()
    selection = select_default_corpus(size_mb, seed)
    if val_fraction is None:  # whole files are documents: keep at least ~2 in val on a tiny corpus
        val_fraction = max(DEFAULT_VAL_FRACTION, min(0.5, 2.0 / len(selection.files)))
    params = _params(seq_len=seq_len, vocab_size=vocab_size, size_mb=size_mb, seed=seed,
                     val_fraction=val_fraction, corpus=selection.describe())
    key = hashlib.sha1(str(output).encode()).hexdigest()[:16]
    with FileLock(os.path.join(tempfile.gettempdir(), f"ratplus-default-dataset-{key}.lock")):
        if (output / MANIFEST_NAME).is_file():
            manifest = read_manifest(output)
            diffs = _diff(manifest.params, params)
            if diffs:
                raise ValueError(
                    f"{output} already holds a different dataset (differs in {'; '.join(diffs)}); "
                    f"it is not overwritten: choose another directory or delete that one"
                )
            if not _complete(output, manifest):
                raise ValueError(f"{output} holds the default dataset's manifest but some of its files are "
                                 f"missing; delete the directory and prepare again")
            return output
        prepare_dataset(
            [str(p) for p in selection.files],
            output,
            seq_len=seq_len,
            train_tokenizer=True,
            vocab_size=vocab_size,
            val_fraction=val_fraction,
            workers=default_workers() if workers is None else workers,
            input_kind="text",
            params=params,
            log=log,
        )
    return output
