"""Fixtures for the data pipeline tests: tiny corpora, one shared prepared dataset, subprocess runs.

Everything is small (a BPE vocabulary of 512, samples of 33 tokens) so the folder runs in well
under three minutes on two CPU cores. Each test that builds loaders uses its own directories, so
streaming's shared-memory registrations (keyed by directory) never collide between tests.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SEQ_LEN = 32
VOCAB = 512
WORKER = Path(__file__).with_name("loader_worker.py")

_WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega", "recurrence", "attention", "sparse", "dense", "chunk", "token", "model", "layer", "gate"]


def make_document(i: int, words: int = 60) -> str:
    """A distinct, deterministic English-ish document (distinct ids make every sample unique)."""
    rng = random.Random(i)
    body = " ".join(rng.choice(_WORDS) + (str(rng.randrange(1000)) if rng.random() < 0.3 else "")
                    for _ in range(words))
    return f"Document {i} begins.\n{body}.\nEnd of document {i}.\n"


def write_corpus(root: Path, n_txt: int = 40, n_jsonl: int = 20, field: str = "text") -> list[str]:
    """Write n_txt .txt files and one .jsonl file; return the documents in the order prepare reads them."""
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_txt):
        text = make_document(i)
        (root / f"a_{i:03d}.txt").write_text(text, encoding="utf-8")
        docs.append(text)
    with open(root / "b_records.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n_txt, n_txt + n_jsonl):
            text = make_document(i)
            fh.write(json.dumps({field: text, "id": i}) + "\n")
            docs.append(text)
    return docs


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, corpus_dir) -> Path:
    """A prepared dataset shared by read-only tests (readers decompress shards into it: harmless)."""
    from megatron_ratplus.data import prepare_dataset

    out = tmp_path_factory.mktemp("ds") / "tiny"
    prepare_dataset([corpus_dir], out, seq_len=SEQ_LEN, train_tokenizer=True, vocab_size=VOCAB,
                    val_fraction=0.2, workers=2)
    return out


@pytest.fixture
def fresh_dataset(tmp_path, dataset_dir) -> Path:
    """A private copy of the shared dataset (for tests that damage or re-host it)."""
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(dataset_dir, dst, ignore=shutil.ignore_patterns("*.mds"))  # keep only the zstd shards
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(mode: str, configs: list[dict], timeout: float = 120) -> list[dict]:
    """Run loader_worker.py once per config, concurrently; return their JSON outputs."""
    procs = []
    for cfg in configs:
        procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, json.dumps(cfg)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise AssertionError(f"worker failed (rc={p.returncode}):\n{err[-4000:]}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs
