"""Bad input gives a clear error naming the problem, and nothing is lost."""
from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer

from megatron_ratplus.data import (
    CorruptShardError,
    build_pretraining_loader,
    check_manifest_compat,
    prepare_dataset,
    read_manifest,
    verify_dataset,
)
from megatron_ratplus.data.sources import have_pyarrow

from .conftest import SEQ_LEN, make_document


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def prep(inputs, out, tok, **kw):
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("workers", 1)
    return prepare_dataset(inputs, out, seq_len=SEQ_LEN, tokenizer=tok, **kw)


def test_empty_inputs(tmp_path, dataset_dir):
    tok = dataset_dir / "tokenizer.json"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no input files found"):
        prep([tmp_path / "empty"], tmp_path / "out", tok)
    with pytest.raises(ValueError, match="no inputs given"):
        prep([], tmp_path / "out", tok)
    with pytest.raises(ValueError, match="does not exist"):
        prep([tmp_path / "missing"], tmp_path / "out", tok)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n")
    (tmp_path / "blank" / "b.jsonl").write_text('{"text": ""}\n\n{"other": "x"}\n{"text": " \\n\\t "}\n')
    with pytest.raises(ValueError, match="empty inputs.*1 records without.*3 empty documents"):
        prep([tmp_path / "blank"], tmp_path / "out", tok)
    (tmp_path / "blank" / "c.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        prep([tmp_path / "blank" / "c.csv"], tmp_path / "out", tok)
    # a failed preparation leaves nothing behind
    assert not (tmp_path / "out").exists()
    # too little text for one sample
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("tiny")
    with pytest.raises(ValueError, match="too small"):
        prep([tmp_path / "short"], tmp_path / "out", tok, val_fraction=0.0)
    (tmp_path / "few").mkdir()
    for i in range(3):
        (tmp_path / "few" / f"{i}.txt").write_text(make_document(i))
    with pytest.raises(ValueError, match="val split got 0 documents"):
        prep([tmp_path / "few"], tmp_path / "out", tok, val_fraction=0.1)
    assert not (tmp_path / "out").exists()    # made by the preparation, removed again when it failed


def test_undecodable_bytes_are_counted_skipped_and_reported(tmp_path, dataset_dir):
    tok_path = dataset_dir / "tokenizer.json"
    (tmp_path / "in").mkdir()
    docs = [make_document(i) for i in range(12)]
    for i, d in enumerate(docs):
        (tmp_path / "in" / f"{i:02d}.txt").write_text(d)
    raw = docs[3].encode()
    (tmp_path / "in" / "03.txt").write_bytes(raw[:10] + b"\xff\xfe" + raw[10:40] + b"\xc3" + raw[40:])
    with open(tmp_path / "in" / "z.jsonl", "wb") as fh:
        fh.write(json.dumps({"text": make_document(50)}).encode() + b"\n")
        fh.write(b'{"text": "caf\xe9 ' + make_document(51).replace("\n", " ").encode() + b'"}\n')
        fh.write(b"{not json\n")
        fh.write(json.dumps({"title": "no text"}).encode() + b"\n")
    r = prep([tmp_path / "in"], tmp_path / "out", tok_path, val_fraction=0.0)
    inputs = r.manifest.inputs
    assert inputs["undecodable_bytes"] == 4
    assert inputs["bad_json_lines"] == 1 and inputs["missing_text_field"] == 1
    assert inputs["documents"] == 14
    assert any("03.txt: 3 undecodable bytes" in p for p in inputs["problems"])
    assert any("z.jsonl:3: not valid JSON" in p for p in inputs["problems"])
    assert any("z.jsonl:4: no string field 'text'" in p for p in inputs["problems"])
    # every document is kept, minus exactly the bad bytes (they sat between ASCII characters)
    tok = Tokenizer.from_file(str(tok_path))
    from .test_prepare import read_samples

    texts = docs + [make_document(50), "caf " + make_document(51).replace("\n", " ")]
    expected = []
    for t in texts:
        expected += tok.encode(t, add_special_tokens=False).ids + [r.manifest.eos_id]
    samples = read_samples(tmp_path / "out", "train")
    rebuilt = [int(t) for t in samples[0]] + [int(t) for s in samples[1:] for t in s[1:]]
    assert len(expected) == r.manifest.splits["train"].tokens
    assert rebuilt == expected[:len(rebuilt)]


def test_manifest_mismatch_with_model_config(dataset_dir):
    m = read_manifest(dataset_dir)
    assert check_manifest_compat(m, vocab_size=m.vocab_size, seq_len=SEQ_LEN) is m
    check_manifest_compat(dataset_dir, vocab_size=m.vocab_size + 100, seq_len=SEQ_LEN)  # padded vocab is fine
    check_manifest_compat(m.to_dict(), vocab_size=1024, seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match=rf"tokenizer has {m.vocab_size} tokens.*vocab_size is 300"):
        check_manifest_compat(m, vocab_size=300, seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match=rf"seq_len {SEQ_LEN}.*seq_len 64"):
        check_manifest_compat(m, vocab_size=1024, seq_len=64)
    with pytest.raises(ValueError, match="seq_len"):
        build_pretraining_loader([{"local": str(dataset_dir)}], split="train", seq_len=64, micro_batch_size=2,
                                 dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ValueError, match="vocab_size is 300"):
        build_pretraining_loader([{"local": str(dataset_dir)}], split="train", seq_len=SEQ_LEN, micro_batch_size=2,
                                 dp_rank=0, dp_size=1, seed=0, vocab_size=300)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(dataset_dir / "train")


def test_output_holding_a_dataset_is_refused_unless_overwrite(tmp_path, corpus_dir, dataset_dir):
    tok = dataset_dir / "tokenizer.json"
    out = tmp_path / "out"
    prep([corpus_dir], out, tok)
    (out / "NOTES.md").write_text("mine")
    (out / "train" / "my-extra.bin").write_bytes(b"keep")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="already holds a dataset.*--overwrite"):
        prep([corpus_dir], out, tok)
    assert snapshot(out) == before
    # a failing overwrite (empty input) loses nothing
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty inputs"):
        prep([tmp_path / "blank"], out, tok, overwrite=True)
    assert snapshot(out) == before
    # a successful overwrite replaces the dataset's own files only
    old_shards = {p.name for p in (out / "train").glob("shard.*")}
    r = prep([corpus_dir], out, tok, overwrite=True, shard_size=2000, compression=None)
    assert r.manifest.splits["train"].shards > 1
    assert (out / "NOTES.md").read_text() == "mine"
    assert (out / "train" / "my-extra.bin").read_bytes() == b"keep"
    new_shards = {p.name for p in (out / "train").glob("shard.*")}
    assert not any(n.endswith(".zstd") for n in new_shards) and old_shards - new_shards
    assert not [p for p in out.iterdir() if p.name.startswith(".ratplus-staging")]
    # MDS data that is not ours is never touched, even with overwrite
    foreign = tmp_path / "foreign"
    shutil.copytree(out / "train", foreign / "train")
    with pytest.raises(FileExistsError, match="not written by ratplus-data"):
        prep([corpus_dir], foreign, tok, overwrite=True)
    assert (foreign / "train" / "index.json").is_file()


def test_missing_remote(tmp_path, dataset_dir, corpus_dir):
    kw = {"split": "train", "seq_len": SEQ_LEN, "micro_batch_size": 2, "dp_rank": 0, "dp_size": 1, "seed": 0,
          "cache_dir": tmp_path / "c"}
    with pytest.raises(ValueError, match="does not exist"):
        build_pretraining_loader([{"remote": str(tmp_path / "nowhere")}], **kw)
    (tmp_path / "empty-bucket").mkdir()
    with pytest.raises(ValueError, match="not reachable: fetching manifest.json failed"):
        build_pretraining_loader([{"remote": str(tmp_path / "empty-bucket")}], **kw)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_pretraining_loader([{"local": str(tmp_path / "nowhere")}], **kw)
    no_val = tmp_path / "noval"
    prep([corpus_dir], no_val, dataset_dir / "tokenizer.json",
         val_fraction=0.0)
    with pytest.raises(ValueError, match="no 'val' split.*--val-fraction 0"):
        build_pretraining_loader([{"local": str(no_val)}], **{**kw, "split": "val"})
    with pytest.raises(ValueError, match="unknown keys"):
        build_pretraining_loader([{"path": str(dataset_dir)}], **kw)


def test_corrupt_shard_local_and_remote(tmp_path, fresh_dataset):
    assert verify_dataset(fresh_dataset) == []
    remote = tmp_path / "remote"
    shutil.copytree(fresh_dataset, remote)
    for root in (fresh_dataset, remote):
        shard = root / "train" / "shard.00000.mds.zstd"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    problems = verify_dataset(fresh_dataset)
    assert len(problems) == 1 and "shard.00000.mds.zstd: corrupt" in problems[0]
    for streams in ([{"local": str(fresh_dataset)}], [{"remote": str(remote)}]):
        ld = build_pretraining_loader(streams, split="train", seq_len=SEQ_LEN, micro_batch_size=2, dp_rank=0,
                                      dp_size=1, seed=0, cache_dir=tmp_path / "cache")
        with pytest.raises(CorruptShardError, match=r"corrupt shard .*shard\.00000\.mds\.zstd.*xxh64"):
            next(iter(ld))
    # the damaged file is still there (nothing deleted), and the val split still reads
    assert (fresh_dataset / "train" / "shard.00000.mds.zstd").is_file()
    val = build_pretraining_loader([{"local": str(fresh_dataset)}], split="val", seq_len=SEQ_LEN,
                                   micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, shuffle=False)
    assert len(list(val)) == len(val) > 0


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, dataset_dir):
    if have_pyarrow():
        pytest.skip("pyarrow is installed (parquet reading is tested in test_prepare)")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="pyarrow is not installed"):
        prep([tmp_path / "d.parquet"], tmp_path / "out", dataset_dir / "tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_bad_tokenizer_and_arguments(tmp_path, corpus_dir, dataset_dir):
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        prep([corpus_dir], tmp_path / "o", tmp_path / "bad.json")
    with pytest.raises(ValueError, match="'<nope>' is not in the vocabulary"):
        prep([corpus_dir], tmp_path / "o", dataset_dir / "tokenizer.json", eos_token="<nope>")
    with pytest.raises(ValueError, match="exactly one"):
        prepare_dataset([corpus_dir], tmp_path / "o", seq_len=8)
    with pytest.raises(ValueError, match="is a directory without a tokenizer.json"):
        prep([corpus_dir], tmp_path / "o", tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        prep([corpus_dir], tmp_path / "o", dataset_dir / "tokenizer.json", val_fraction=1.0)
    with pytest.raises(ValueError, match="at least 257"):
        prepare_dataset([corpus_dir], tmp_path / "o", seq_len=8, train_tokenizer=True, vocab_size=100)


def test_a_model_folder_gives_its_tokenizer(tmp_path, corpus_dir, dataset_dir):
    """--tokenizer may name a Hugging Face model folder: its tokenizer.json is used."""
    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((dataset_dir / "tokenizer.json").read_bytes())
    result = prep([corpus_dir], tmp_path / "o", folder, val_fraction=0.2)
    assert result.manifest.tokenizer_sha256 == read_manifest(dataset_dir).tokenizer_sha256


def test_a_utf8_byte_order_mark_starts_no_document(tmp_path):
    """Files saved with a UTF-8 byte order mark (Windows editors, PowerShell, spreadsheet exports):
    the mark is no text. It had made the first JSON line of a .jsonl "not valid JSON" (its record
    skipped) and been kept as a U+FEFF character at the start of a .txt document."""
    from megatron_ratplus.data.sources import InputFile, ReadStats, iter_pieces

    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "first"}\r\n{"text": "second"}\n')
    (tmp_path / "b.txt").write_bytes(bom + "héllo wörld".encode())
    (tmp_path / "c.txt").write_bytes("\ufeffinside".encode()[3:] + " x \ufeff y".encode())  # only a leading mark goes
    stats = ReadStats()
    pieces = list(iter_pieces([InputFile(tmp_path / "a.jsonl", "jsonl"), InputFile(tmp_path / "b.txt", "text"),
                               InputFile(tmp_path / "c.txt", "text")], stats=stats, piece_chars=4))
    texts = "".join(t + ("|" if ends else "") for t, ends in pieces)
    assert texts == "first|second|héllo wörld|inside x \ufeff y|"
    assert stats.bad_json_lines == 0 and stats.documents == 4 and not stats.problems
