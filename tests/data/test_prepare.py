"""Preparation: round trip of the token stream, packing, split, manifest counts, determinism."""
from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from megatron_ratplus.data import prepare_dataset, read_manifest
from megatron_ratplus.data.sources import InputFile, ReadStats, iter_pieces

from .conftest import SEQ_LEN, VOCAB, make_document, write_corpus


def read_samples(directory: Path, split: str) -> list[np.ndarray]:
    """Every sample of a split, in storage order, through streaming's own reader."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(directory), split=split, shuffle=False, batch_size=1)
    return [ds[i]["tokens"] for i in range(ds.num_samples)]


def expected_split(docs: list[str], fraction: float) -> dict[str, list[str]]:
    f = Fraction(fraction).limit_denominator(1_000_000)
    out = {"train": [], "val": []}
    for i, d in enumerate(docs):
        out["val" if (f * (i + 1)).__floor__() > (f * i).__floor__() else "train"].append(d)
    return out


def test_round_trip_token_stream(tmp_path):
    docs = write_corpus(tmp_path / "in", n_txt=25, n_jsonl=15, field="body")
    result = prepare_dataset([tmp_path / "in"], tmp_path / "ds", seq_len=SEQ_LEN, train_tokenizer=True,
                             vocab_size=VOCAB, val_fraction=0.25, workers=2, text_field="body")
    m = read_manifest(tmp_path / "ds")
    assert m == result.manifest
    tok = Tokenizer.from_file(str(tmp_path / "ds" / "tokenizer.json"))
    assert m.eos_id == tok.token_to_id("<|endoftext|>")
    assert m.vocab_size == tok.get_vocab_size() <= VOCAB
    assert m.dtype == "uint16" and m.seq_len == SEQ_LEN
    split_docs = expected_split(docs, 0.25)
    assert len(split_docs["val"]) == 10  # exactly a quarter, evenly spread
    for split, docs_in_split in split_docs.items():
        stream = []
        for d in docs_in_split:
            stream += tok.encode(d, add_special_tokens=False).ids + [m.eos_id]
        samples = read_samples(tmp_path / "ds", split)
        info = m.splits[split]
        assert info.documents == len(docs_in_split)
        assert info.tokens == len(stream)
        assert info.samples == len(samples) == (len(stream) - 1) // SEQ_LEN
        assert info.unused_tail_tokens == len(stream) - (info.samples * SEQ_LEN + 1)
        assert all(s.shape == (SEQ_LEN + 1,) for s in samples)
        # consecutive samples overlap by one token; together they are the stream's prefix
        rebuilt = list(samples[0])
        for prev, cur in itertools.pairwise(samples):
            assert prev[-1] == cur[0]
            rebuilt += list(cur[1:])
        assert rebuilt == stream[:len(rebuilt)]
        # EOS exactly between documents (the vocabulary has no other EOS occurrences)
        eos_at = [i for i, t in enumerate(rebuilt) if t == m.eos_id]
        bounds = np.cumsum([len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in docs_in_split]) - 1
        assert eos_at == [b for b in bounds if b < len(rebuilt)]
    assert m.inputs["documents"] == len(docs) and m.inputs["files"] == 26
    assert m.tokenizer_sha256 == __import__("hashlib").sha256((tmp_path / "ds" / "tokenizer.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("workers", [1, 2])
def test_special_token_text_inside_a_document_is_not_a_boundary(tmp_path, workers):
    """Source code quoting "<|endoftext|>" is text: EOS appears only between documents."""
    (tmp_path / "in").mkdir()
    docs = [make_document(i) for i in range(12)]
    docs[3] = 'tok = "<|endoftext|>"  # the GPT-2 end-of-text marker\n' + docs[3]
    for i, d in enumerate(docs):
        (tmp_path / "in" / f"{i:03d}.txt").write_text(d)
    prepare_dataset([tmp_path / "in"], tmp_path / "ds", seq_len=SEQ_LEN, train_tokenizer=True, vocab_size=VOCAB,
                    val_fraction=0, workers=workers)
    m = read_manifest(tmp_path / "ds")
    samples = read_samples(tmp_path / "ds", "train")
    stream = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]])
    tok = Tokenizer.from_file(str(tmp_path / "ds" / "tokenizer.json"))
    tok.encode_special_tokens = True
    lengths = [len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in docs]
    assert m.splits["train"].documents == 12 and m.splits["train"].tokens == sum(lengths)
    bounds = np.cumsum(lengths) - 1
    assert np.flatnonzero(stream == m.eos_id).tolist() == [b for b in bounds if b < len(stream)]
    assert 'tok = "<|endoftext|>"' in tok.decode(stream[bounds[2] + 1:bounds[3]].tolist())


def test_output_independent_of_worker_count(tmp_path, corpus_dir, dataset_dir):
    """Order is kept whatever the number of tokenizer processes (1 = in-process)."""
    tok = dataset_dir / "tokenizer.json"
    one = prepare_dataset([corpus_dir], tmp_path / "w1", seq_len=SEQ_LEN, tokenizer=tok, val_fraction=0.2, workers=1)
    shared = read_manifest(dataset_dir)
    for split in ("train", "val"):
        assert one.manifest.splits[split] == shared.splits[split]  # dataset_dir was made with 2 workers
    assert one.manifest.tokenizer_sha256 == shared.tokenizer_sha256


def test_given_tokenizer_with_its_own_eos(tmp_path, corpus_dir, dataset_dir):
    """A user tokenizer.json whose EOS is named in tokenizer_config.json (LLaMA style: </s>)."""
    data = json.loads((dataset_dir / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "</s>"
    vocab = data["model"]["vocab"]
    vocab["</s>"] = vocab.pop("<|endoftext|>")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    r = prepare_dataset([corpus_dir], tmp_path / "ds", seq_len=SEQ_LEN, tokenizer=tmp_path / "tok" / "tokenizer.json",
                        val_fraction=0.2, workers=1, compression="none")
    assert (r.manifest.eos_token, r.manifest.eos_id) == ("</s>", 0)
    assert r.manifest.compression is None
    assert sorted(p.suffix for p in (tmp_path / "ds" / "train").glob("shard.*")) == [".mds"]
    # the tokenizer travels with the dataset, byte for byte
    assert (tmp_path / "ds" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert r.manifest.splits["train"].content_xxh64 == read_manifest(dataset_dir).splits["train"].content_xxh64


def test_large_text_read_in_bounded_pieces(tmp_path):
    lines = [f"line {i} " + "x" * (i % 50) + "\n" for i in range(3000)]
    text = "".join(lines)
    (tmp_path / "big.txt").write_text(text)
    pieces = list(iter_pieces([InputFile(tmp_path / "big.txt", "text")], piece_chars=4096))
    assert len(pieces) > 20
    assert all(len(t) <= 2 * 4096 for t, _ in pieces)
    assert [ends for _, ends in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(t for t, _ in pieces) == text
    # cut before a space between two words, where tokenizers start a new pre-token
    assert all(t[-1] not in " \n" and nxt[0] == " " and nxt[1] != " " for (t, _), (nxt, _) in zip(pieces, pieces[1:]))


@pytest.mark.parametrize("text,expected", [
    ("aaaa bbbb cccc", 9),             # before the last space between words within the limit
    ("aaaa  bbbb cccc", 10),           # a run of spaces is not cut
    ("aaaa\nbbbbbbbbbb", 5),           # no word gap: after the last line end
    ("aaaaaaaaaaaaaaaaaaa", 12),       # neither: at the limit
    ("short", 5),
])
def test_cut_points(text, expected):
    from megatron_ratplus.data.sources import cut_point
    assert cut_point(text, 0, 12) == expected


def _metaspace_tokenizer(path: Path) -> Path:
    """A SentencePiece-style tokenizer (Llama/Mistral: "▁" prepended to the first word of an input)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator([make_document(i) for i in range(50)],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"], show_progress=False))
    tok.save(str(path))
    return path


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_long_documents_tokenise_as_a_whole(kind, dataset_dir, tmp_path):
    """A document cut into pieces gets the tokens of the whole document: a continuation piece is
    tokenised behind the end of its predecessor, so a SentencePiece-style tokenizer does not put a
    "▁" (a space) at every piece boundary."""
    from megatron_ratplus.data import _tokenize_worker
    from megatron_ratplus.data.prepare import _tasks
    from megatron_ratplus.data.sources import _document_pieces

    path = dataset_dir / "tokenizer.json" if kind == "byte_level" else _metaspace_tokenizer(tmp_path / "tok.json")
    doc = "\n".join(make_document(i) for i in range(40)) + "\n" + "x" * 3000
    pieces = list(_document_pieces(doc, 700))
    assert len(pieces) > 5
    _tokenize_worker.init_worker(str(path), single_threaded=False)
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    whole = tok.encode(doc, add_special_tokens=False).ids
    tokens = [_tokenize_worker.encode_pieces(texts, contexts)[0]
              for texts, contexts, _ in _tasks(iter(pieces), Fraction(0))]
    assert np.concatenate(tokens).tolist() == whole
    if kind == "byte_level":  # a cut inside a word (no gap within the limit): the text is kept exactly
        assert tok.decode(_tokenize_worker.encode_continuation("the quick bro", "wn fox jumps")) == "wn fox jumps"
    if kind == "metaspace":   # the failure fixed: alone, every continuation piece starts with "▁"
        alone = [_tokenize_worker.encode_pieces([t])[0] for t, _ in pieces]
        assert np.concatenate(alone).tolist() != whole


def test_multibyte_text_split_across_reads(tmp_path):
    text = "héllo wörld ☃ " * 2000
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    stats = ReadStats()
    pieces = list(iter_pieces([InputFile(tmp_path / "u.txt", "text")], piece_chars=1000, stats=stats))
    assert "".join(t for t, _ in pieces) == text
    assert stats.undecodable_bytes == 0 and stats.documents == 1


@pytest.mark.skipif(not __import__("megatron_ratplus.data.sources", fromlist=["x"]).have_pyarrow(),
                    reason="pyarrow not installed (the missing-pyarrow error is tested in test_bad_inputs)")
def test_parquet_input(tmp_path, dataset_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .conftest import make_document

    docs = [make_document(i) for i in range(30)]
    pq.write_table(pa.table({"content": docs}), tmp_path / "d.parquet")
    r = prepare_dataset([tmp_path / "d.parquet"], tmp_path / "ds", seq_len=SEQ_LEN, tokenizer=dataset_dir / "tokenizer.json",
                        val_fraction=0.0, workers=1, text_field="content")
    assert r.manifest.splits["train"].documents == 30


@pytest.mark.parametrize("seq_len", [1, 4, 7])
@pytest.mark.parametrize("flush_tokens", [1, 5, 13, 1 << 18])
def test_packer_matches_the_stream_convention_at_any_flush_size(seq_len, flush_tokens):
    """Samples are ``stream[i*seq_len : i*seq_len + seq_len + 1]`` of the EOS-joined documents however
    often the packer flushes (a flush keeps the one-token overlap), including streams whose length is a
    multiple of ``seq_len`` or one more than that; counts and the content hash are those of the stream."""
    import xxhash

    from megatron_ratplus.data.packing import SamplePacker

    rng = np.random.default_rng(seq_len * 1000 + flush_tokens)
    for total_docs in range(0, 9):
        docs = [rng.integers(1, 500, size=int(rng.integers(0, 11))).astype(np.uint16) for _ in range(total_docs)]
        stream = np.concatenate([np.append(d, np.uint16(999)) for d in docs]) if docs else np.zeros(0, np.uint16)
        for extra in range(0, seq_len + 2):   # lengths around every multiple of seq_len
            tail = rng.integers(1, 500, size=extra).astype(np.uint16)
            full = np.concatenate([stream, tail])
            got = []
            packer = SamplePacker(seq_len, np.uint16, lambda s: got.append(s.copy()), flush_tokens=flush_tokens)
            for d in docs:
                for part in np.array_split(d, 3):   # pieces of a document, some empty
                    packer.add(part)
                packer.end_document(999)
            packer.add(tail)
            counts = packer.finish()
            n = max(len(full) - 1, 0) // seq_len
            expected = [full[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]
            assert len(got) == n and all(np.array_equal(a, b) for a, b in zip(got, expected))
            assert counts["samples"] == n and counts["tokens"] == len(full) and counts["documents"] == total_docs
            assert counts["unused_tail_tokens"] == (len(full) - (n * seq_len + 1) if n else len(full))
            assert counts["content_xxh64"] == xxhash.xxh64(b"".join(s.tobytes() for s in expected)).hexdigest()


def test_documents_cut_into_pieces_and_many_tasks_keep_their_split_and_order(tmp_path, dataset_dir, monkeypatch):
    """Documents read in several pieces (text files and JSON lines), pieces grouped into many small tasks on two tokenizer workers:
    each document goes whole to the split its index gives (val fraction 0.3: exactly documents 3, 6, 9,
    13, 16, 19 of 20 -- 0.3 is not exact in binary), in input order, tokenised as a whole and followed
    by one EOS; the manifest's content hash is that of the stored samples."""
    import functools

    import xxhash

    from megatron_ratplus.data import prepare as prepare_mod

    docs = [make_document(i, words=40 + 7 * i) for i in range(20)]
    (tmp_path / "in").mkdir()
    for i, d in enumerate(docs[:10]):           # .txt files and .jsonl records are cut by different readers
        (tmp_path / "in" / f"{i:03d}.txt").write_text(d)
    (tmp_path / "in" / "z.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[10:]))
    monkeypatch.setattr(prepare_mod, "iter_pieces", functools.partial(prepare_mod.iter_pieces, piece_chars=150))
    monkeypatch.setattr(prepare_mod, "TASK_PIECES", 3)
    m = prepare_dataset([tmp_path / "in"], tmp_path / "ds", seq_len=SEQ_LEN, tokenizer=dataset_dir / "tokenizer.json",
                        val_fraction=0.3, workers=2).manifest
    tok = Tokenizer.from_file(str(dataset_dir / "tokenizer.json"))
    val_docs = [3, 6, 9, 13, 16, 19]
    for split, members in (("train", [i for i in range(20) if i not in val_docs]), ("val", val_docs)):
        stream = [t for i in members for t in tok.encode(docs[i], add_special_tokens=False).ids + [m.eos_id]]
        samples = read_samples(tmp_path / "ds", split)
        rebuilt = [int(t) for t in samples[0]] + [int(t) for s in samples[1:] for t in s[1:]]
        assert rebuilt == stream[:len(rebuilt)] and len(samples) == (len(stream) - 1) // SEQ_LEN
        info = m.splits[split]
        assert (info.documents, info.tokens, info.samples) == (len(members), len(stream), len(samples))
        assert info.shards == len(list((tmp_path / "ds" / split).glob("shard.*.mds.zstd"))) >= 1
        assert info.content_xxh64 == xxhash.xxh64(b"".join(np.asarray(s).tobytes() for s in samples)).hexdigest()


def test_tokenizer_config_names_the_eos_among_several_candidates(tmp_path, dataset_dir):
    """A vocabulary holding more than one usual EOS name: tokenizer_config.json's eos_token decides
    (the first usual name only without a config)."""
    from megatron_ratplus.data.tokenizer import load_tokenizer_info

    tok = Tokenizer.from_file(str(dataset_dir / "tokenizer.json"))
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer_info(tmp_path / "tokenizer.json").eos_token == "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    info = load_tokenizer_info(tmp_path / "tokenizer.json")
    assert (info.eos_token, info.eos_id) == ("</s>", tok.token_to_id("</s>"))
    assert info.vocab_size == tok.get_vocab_size(with_added_tokens=True)
