"""Streaming pretraining data on mosaicml-streaming (MDS shards of packed token sequences).

Modules (one job each):

- ``corpus``      the embedded default corpus (Python sources found on this machine)
- ``sources``     streaming readers for .txt / .jsonl / .parquet inputs (bounded memory)
- ``tokenizer``   tokenizer.json identity (sha256, vocab, EOS) and byte-level BPE training
- ``packing``     documents joined by EOS, cut into samples of exactly ``seq_len + 1`` tokens
- ``layout``      what a prepared dataset directory holds, owned files, safe replacement, abandoned staging
- ``manifest``    ``manifest.json``: read / write / compatibility checks
- ``integrity``   shard hashes: ``ratplus-data validate``, what the loader checks and why
- ``prepare``     the preparation pipeline (worker processes, MDSWriter, train/val split)
- ``default``     ``prepare_default_dataset``: idempotent demo dataset from the default corpus
- ``loader``      ``build_pretraining_loader``: rank-aware StreamingDataset with exact resume
- ``distributed`` ``broadcast_batch``: one reader per model-parallel group, others receive
- ``cli``         the ``ratplus-data`` console command

Importing this package is cheap: names are resolved lazily, so the tokenisation worker processes
(which import ``megatron_ratplus.data._tokenize_worker``) never import torch or streaming.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare_dataset": "prepare",
    "PrepareResult": "prepare",
    "prepare_default_dataset": "default",
    "select_default_corpus": "corpus",
    "write_default_corpus_jsonl": "corpus",
    "DatasetManifest": "manifest",
    "read_manifest": "manifest",
    "check_manifest_compat": "manifest",
    "verify_dataset": "integrity",
    "verify_shards": "integrity",
    "load_tokenizer_info": "tokenizer",
    "train_bpe_tokenizer": "tokenizer",
    "build_pretraining_loader": "loader",
    "PretrainingLoader": "loader",
    "CorruptShardError": "loader",
    "broadcast_batch": "distributed",
}

__all__ = [
    "CorruptShardError",
    "DatasetManifest",
    "PrepareResult",
    "PretrainingLoader",
    "broadcast_batch",
    "build_pretraining_loader",
    "check_manifest_compat",
    "load_tokenizer_info",
    "prepare_dataset",
    "prepare_default_dataset",
    "read_manifest",
    "select_default_corpus",
    "train_bpe_tokenizer",
    "verify_dataset",
    "verify_shards",
    "write_default_corpus_jsonl",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
