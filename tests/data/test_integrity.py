"""Shard integrity: `ratplus-data validate` names a damaged shard (a flipped byte keeps the size, so
only the recorded hash tells), the loader checks raw shards read in place only when asked, and a
dataset whose index records no hashes still validates and loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_ratplus.data import CorruptShardError, build_pretraining_loader, prepare_dataset
from megatron_ratplus.data.cli import main

from .conftest import SEQ_LEN


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def strip_hashes(directory: Path) -> None:
    """Make ``directory`` look like a dataset written without ``hashes=``."""
    for index in directory.glob("*/index.json"):
        meta = json.loads(index.read_text())
        for shard in meta["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["hashes"] = {}
        index.write_text(json.dumps(meta))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["hashes"] = []
    (directory / "manifest.json").write_text(json.dumps(manifest))


def loader(directory: Path, **kw):
    return build_pretraining_loader(str(directory), split="train", seq_len=SEQ_LEN, micro_batch_size=2,
                                    dp_rank=0, dp_size=1, seed=0, **kw)


def test_validate_names_the_damaged_shard(fresh_dataset, capsys):
    assert main(["validate", str(fresh_dataset)]) == 0
    assert "verify: OK" in capsys.readouterr().out
    shard = fresh_dataset / "val" / "shard.00000.mds.zstd"
    size = shard.stat().st_size
    flip_byte(shard)
    assert shard.stat().st_size == size
    assert main(["validate", str(fresh_dataset)]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT  {shard}: corrupt: its xxh64 does not match" in out and "verify: 1 problem(s)" in out
    # a truncated file is named by its size; a foreign tokenizer.json by its sha256
    train = fresh_dataset / "train" / "shard.00000.mds.zstd"
    train.write_bytes(train.read_bytes()[:-3])
    (fresh_dataset / "tokenizer.json").write_text((fresh_dataset / "tokenizer.json").read_text() + " ")
    assert main(["validate", str(fresh_dataset)]) == 1
    out = capsys.readouterr().out
    assert f"{train}: corrupt: {train.stat().st_size} bytes where" in out and "truncated" in out
    assert "tokenizer.json: its sha256 does not match" in out and "verify: 3 problem(s)" in out


def test_raw_shards_in_place_are_hashed_when_asked(tmp_path, corpus_dir, dataset_dir, capsys):
    """Uncompressed shards read in place: streaming never hashes them (nothing is downloaded or
    decompressed); ``verify_shards=True`` does, before the loader is built."""
    out = tmp_path / "raw"
    prepare_dataset([corpus_dir / "b_records.jsonl"], out, seq_len=SEQ_LEN, tokenizer=dataset_dir / "tokenizer.json",
                    val_fraction=0, workers=1, compression=None)
    shard = out / "train" / "shard.00000.mds"
    flip_byte(shard)
    assert main(["validate", str(out)]) == 1
    assert f"CORRUPT  {shard}: corrupt: its xxh64" in capsys.readouterr().out
    with pytest.raises(CorruptShardError, match=r"split 'train': 1 damaged .*shard\.00000\.mds: corrupt"):
        loader(out, verify_shards=True)
    assert len(next(iter(loader(out)))) == 2  # the default: read as it is (see data.integrity)


def test_dataset_without_hashes_validates_and_loads(fresh_dataset, capsys):
    strip_hashes(fresh_dataset)
    assert main(["validate", str(fresh_dataset)]) == 0
    out = capsys.readouterr().out
    assert "have no recorded hash" in out and "checked for size only" in out and "verify: OK" in out
    with pytest.warns(RuntimeWarning, match="records no shard hashes"):
        ld = loader(fresh_dataset, verify_shards=True)
    assert next(iter(ld)).shape == (2, SEQ_LEN + 1)
    # sizes are still checked
    shard = fresh_dataset / "train" / "shard.00000.mds.zstd"
    shard.write_bytes(shard.read_bytes()[:-1])
    assert main(["validate", str(fresh_dataset)]) == 1
    assert f"{shard}: corrupt:" in capsys.readouterr().out


def test_validate_compares_each_split_with_the_manifests_sample_count(fresh_dataset):
    """A split whose index.json and the manifest disagree on the sample count (an index from another
    preparation copied in) is reported, although every shard file matches its index."""
    from megatron_ratplus.data import verify_dataset

    manifest = json.loads((fresh_dataset / "manifest.json").read_text())
    manifest["splits"]["val"]["samples"] += 1
    (fresh_dataset / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_dataset(fresh_dataset)
    assert len(problems) == 1 and "val/index.json" in problems[0] and "the manifest says" in problems[0]


def test_preferred_hash_is_the_fastest_recorded_then_any_recorded():
    from megatron_ratplus.data.integrity import preferred_hash
    assert preferred_hash(["sha1", "xxh64"]) == "xxh64"
    assert preferred_hash(("sha1",)) == "sha1"
    # written by another tool with only a hash we do not prefer: still checked, by loader and validate alike
    assert preferred_hash(["sha256", "md5"]) == "md5"
    assert preferred_hash([]) is None
