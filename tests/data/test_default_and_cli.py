"""The embedded default corpus, prepare_default_dataset's idempotence, and the ratplus-data command."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_ratplus.data import prepare_default_dataset, read_manifest, select_default_corpus
from megatron_ratplus.data.cli import main

from .conftest import SEQ_LEN


def test_default_corpus_selection_is_deterministic_real_text():
    a = select_default_corpus(0.2, seed=1)
    assert a == select_default_corpus(0.2, seed=1)
    b = select_default_corpus(0.2, seed=2)
    assert a.names != b.names and a.fingerprint != b.fingerprint
    assert 0.2e6 <= a.total_bytes < 0.2e6 + (1 << 20)
    assert all(n.startswith("stdlib/") and n.endswith(".py") for n in a.names)  # stdlib first
    text = a.files[0].read_text(encoding="utf-8", errors="ignore")
    assert len(text) > 0
    big = select_default_corpus(40.0, seed=1)  # more than the standard library: site-packages join
    assert any(not n.startswith("stdlib/") for n in big.names)
    with pytest.raises(ValueError, match="has only"):
        select_default_corpus(1e7)


def test_prepare_default_dataset_is_idempotent(tmp_path, dataset_dir):
    out = tmp_path / "default"
    path = prepare_default_dataset(out, seq_len=SEQ_LEN, vocab_size=512, size_mb=0.25, seed=3, workers=2)
    assert path == out.resolve()
    m = read_manifest(out)
    assert m.params["kind"] == "default-corpus" and m.params["corpus"]["files"] > 1
    assert m.vocab_size == 512 and m.splits["train"].samples > 100 and m.splits["val"].samples > 0
    stamp = (out / "manifest.json").stat().st_mtime_ns
    files = sorted(p.name for p in out.rglob("*"))
    # same parameters: reused as is
    assert prepare_default_dataset(out, seq_len=SEQ_LEN, vocab_size=512, size_mb=0.25, seed=3, workers=1) == path
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and sorted(p.name for p in out.rglob("*")) == files
    # different parameters: a clear error, nothing overwritten
    with pytest.raises(ValueError, match=r"different dataset.*seed: existing 3 vs requested 4"):
        prepare_default_dataset(out, seq_len=SEQ_LEN, vocab_size=512, size_mb=0.25, seed=4)
    with pytest.raises(ValueError, match=r"vocab_size: existing 512 vs requested 1024"):
        prepare_default_dataset(out, seq_len=SEQ_LEN, vocab_size=1024, size_mb=0.25, seed=3)
    with pytest.raises(ValueError, match="different dataset"):
        prepare_default_dataset(dataset_dir, seq_len=SEQ_LEN, vocab_size=512, size_mb=0.25, seed=3)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    # deterministic: a second directory gets identical shards content
    again = prepare_default_dataset(tmp_path / "again", seq_len=SEQ_LEN, vocab_size=512, size_mb=0.25, seed=3, workers=1)
    assert read_manifest(again).splits == m.splits and read_manifest(again).tokenizer_sha256 == m.tokenizer_sha256


def test_cli_prepare_inspect_and_errors(tmp_path, corpus_dir, dataset_dir, capsys):
    out = tmp_path / "ds"
    rc = main(["prepare", str(corpus_dir), "--output", str(out), "--seq-len", str(SEQ_LEN), "--tokenizer",
               str(dataset_dir / "tokenizer.json"), "--val-fraction", "0.2", "--workers", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "tokens/s" in printed
    assert read_manifest(out).splits == read_manifest(dataset_dir).splits
    assert main(["inspect", str(out), "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == SEQ_LEN
    # refusing to clobber: exit status 2 and one line naming the problem
    rc = main(["prepare", str(corpus_dir), "--output", str(out), "--seq-len", str(SEQ_LEN), "--tokenizer",
               str(dataset_dir / "tokenizer.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a dataset" in err and "Traceback" not in err
    assert main(["prepare", str(corpus_dir), "-o", str(tmp_path / "x"), "--seq-len", "8", "--train-tokenizer"]) == 2
    assert "needs --vocab-size" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    # a corrupt shard makes --verify fail
    shard = next((out / "train").glob("shard.*.zstd"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    assert main(["inspect", str(out), "--verify"]) == 1
    assert "CORRUPT" in capsys.readouterr().out
    # a damaged index.json is named
    (out / "val" / "index.json").write_text('{"shards": [\n')
    assert main(["inspect", str(out), "--verify"]) == 1
    assert f"{out / 'val' / 'index.json'}: not valid JSON" in capsys.readouterr().out


def test_cli_default_corpus_as_a_command(tmp_path):
    """The real entry point in a subprocess: writes the corpus as JSONL and prepares it."""
    jsonl = tmp_path / "corpus.jsonl"
    cmd = [sys.executable, "-m", "megatron_ratplus.data.cli", "default-corpus", "--text-out", str(jsonl),
           "--output", str(tmp_path / "ds"), "--size-mb", "0.1", "--seq-len", "64", "--vocab-size", "300",
           "--workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    selection = select_default_corpus(0.1, seed=1234)
    nonblank = [n for n, f in zip(selection.names, selection.files) if f.read_text(errors="ignore").strip()]
    assert [r["source"] for r in records] == nonblank and len(nonblank) > 5
    m = read_manifest(tmp_path / "ds")
    assert m.params["corpus"]["sha256"] == selection.fingerprint and m.vocab_size == 300
    assert "default-corpus" in proc.stdout
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr  # the JSONL is not overwritten


def test_clean_streaming_leftovers_of_dead_jobs(tmp_path, monkeypatch, capsys):
    """Leftover shared memory and lock files (as a killed job leaves them) are found and removed."""
    import tempfile
    from multiprocessing import resource_tracker, shared_memory

    from megatron_ratplus.data.housekeeping import SHM_DIR, clean_streaming_leftovers

    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    prefix = "9" + f"{abs(hash(str(tmp_path))) % 10**5:05d}"
    shm = shared_memory.SharedMemory(name=f"{prefix}_resume", create=True, size=16)
    resource_tracker.unregister(shm._name, "shared_memory")  # as if its process had died
    shm.close()
    (tmp_path / f"{prefix}_barrier_filelock").write_text("")
    (tmp_path / "unrelated_filelock").write_text("")
    found = clean_streaming_leftovers(dry_run=True, only_prefixes={prefix})
    assert [p.name for p in found[0]] == [f"{prefix}_resume"] and len(found[1]) == 1
    assert (SHM_DIR / f"{prefix}_resume").exists()
    clean_streaming_leftovers(only_prefixes={prefix})
    assert not (SHM_DIR / f"{prefix}_resume").exists()
    assert not (tmp_path / f"{prefix}_barrier_filelock").exists() and (tmp_path / "unrelated_filelock").exists()
    assert main(["clean-shm"]) == 0 and "would remove" in capsys.readouterr().out  # lists, deletes nothing


def test_many_streaming_leftovers_warn(tmp_path, monkeypatch):
    """Many shared-memory prefixes on the node (each costs every new streaming dataset a file
    descriptor) give a warning naming the clean-up command; a few do not."""
    import warnings

    from megatron_ratplus.data import housekeeping

    monkeypatch.setattr(housekeeping, "SHM_DIR", tmp_path)
    for i in range(5):
        for what in ("locals", "barrier", "resume"):
            (tmp_path / f"{i:06d}_{what}").write_text("")
    (tmp_path / "000099_unrelated").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert housekeeping.warn_about_leftovers(threshold=5) == 5
    with pytest.warns(RuntimeWarning, match="5 prefixes .* ratplus-data clean-shm --force"):
        assert housekeeping.warn_about_leftovers(threshold=4) == 5


def _locals_record(dirs: list[str], prefix: int) -> bytes:
    """Streaming's ``NNNNNN_locals`` layout: int32 byte count, then NUL-separated dirs and prefix."""
    data = ("\0".join(dirs) + f"\0{prefix}").encode()
    return (4 + len(data)).to_bytes(4, "little") + data


def test_prefixes_reading_a_directory(tmp_path, monkeypatch):
    """The prefixes whose registered local directories lie under a directory (what a finished test
    session cleans), and no others: not another directory, not a sibling sharing its name's start."""
    from megatron_ratplus.data import housekeeping

    monkeypatch.setattr(housekeeping, "SHM_DIR", tmp_path / "shm")
    (tmp_path / "shm").mkdir()
    (tmp_path / "shm" / "000001_locals").write_bytes(_locals_record([str(tmp_path / "data" / "train")], 1))
    (tmp_path / "shm" / "000002_locals").write_bytes(_locals_record(["/elsewhere/train"], 2))
    (tmp_path / "shm" / "000003_resume").write_bytes(str(tmp_path / "data").encode())   # not a locals
    (tmp_path / "shm" / "000004_locals").write_bytes(_locals_record([str(tmp_path / "data2" / "val")], 4))
    assert housekeeping.prefixes_reading(tmp_path / "data") == {"000001"}
    assert housekeeping.prefixes_reading(tmp_path / "other") == set()


def _locals_record(directories, prefix: int, zeroed: bool = False) -> bytes:
    """streaming's NNNNNN_locals: an int32 byte count (itself included), then NUL-terminated fields."""
    body = b"".join(d.encode() + b"\0" for d in [*directories, str(prefix)])
    return (0 if zeroed else 4 + len(body)).to_bytes(4, "little") + body


def test_prefixes_of_removed_directories_are_only_those_of_deleted_data(tmp_path, monkeypatch):
    from megatron_ratplus.data import housekeeping

    shm, root = tmp_path / "shm", tmp_path / "pytest-of-me"
    shm.mkdir()
    alive, gone, elsewhere = root / "pytest-7" / "data", root / "pytest-3" / "data", tmp_path / "gone-elsewhere"
    alive.mkdir(parents=True)
    records = {1: _locals_record([str(alive)], 1), 2: _locals_record([str(gone)], 2),
               3: _locals_record([str(gone)], 3, zeroed=True),      # a process killed while leaving
               4: _locals_record([str(elsewhere)], 4),             # gone, but not under root
               5: _locals_record([str(gone), str(alive)], 5)}       # one of its directories still exists
    for prefix, data in records.items():
        (shm / f"{prefix:06d}_locals").write_bytes(data)
    monkeypatch.setattr(housekeeping, "SHM_DIR", shm)
    assert housekeeping.prefixes_of_removed_directories(root) == {"000002", "000003"}
