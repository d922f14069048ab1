"""Loader: shapes, epochs, validation, exact resume in a new process, remotes, mixing, DP/TP layout."""
from __future__ import annotations

import itertools
import json
import shutil
import warnings

import pytest
import torch

from megatron_ratplus.data import broadcast_batch, build_pretraining_loader, read_manifest

from .conftest import SEQ_LEN, free_port, run_workers


def loader(path, split="train", **kw):
    kw.setdefault("micro_batch_size", 4)
    kw.setdefault("seed", 17)
    return build_pretraining_loader([{"local": str(path), "remote": None, "proportion": None}], split=split,
                                    seq_len=SEQ_LEN, dp_rank=kw.pop("dp_rank", 0), dp_size=kw.pop("dp_size", 1), **kw)


def rows(batches) -> list[tuple]:
    return [tuple(r) for b in batches for r in b.tolist()]


def all_samples(path, split) -> list[tuple]:
    from .test_prepare import read_samples

    return [tuple(int(t) for t in s) for s in read_samples(path, split)]


def test_batches_epochs_and_validation(dataset_dir):
    m = read_manifest(dataset_dir)
    train = loader(dataset_dir)
    val = loader(dataset_dir, split="val", shuffle=False)
    n = len(train)
    assert n == m.splits["train"].samples // 4
    it = iter(train)
    epoch0 = [next(it) for _ in range(n)]
    assert all(b.dtype == torch.int64 and b.shape == (4, SEQ_LEN + 1) for b in epoch0)
    assert all(int(b.max()) < m.vocab_size and int(b.min()) >= 0 for b in epoch0)
    assert train.epoch == 0
    # one epoch = distinct samples, all from the train split
    seen = rows(epoch0)
    assert len(set(seen)) == len(seen) == 4 * n
    every = set(all_samples(dataset_dir, "train"))
    assert set(seen) <= every and len(every) - len(seen) < 4  # only the partial tail batch is dropped
    # validation interleaved with training: two passes give the same batches, len() is honest
    v1, v2 = list(val), list(val)
    assert len(v1) == len(val) == m.splits["val"].samples // 4 > 0
    assert all(torch.equal(a, b) for a, b in zip(v1, v2))
    assert rows(v1) == all_samples(dataset_dir, "val")[:4 * len(v1)]  # unshuffled: storage order
    # the train loader is infinite: the next epoch is a reshuffle of the same samples
    epoch1 = [next(it) for _ in range(n)]
    assert train.epoch == 1
    assert set(rows(epoch1)) <= every and len(set(rows(epoch1)) ^ set(seen)) <= 2 * (len(every) - len(seen))
    assert rows(epoch1) != seen
    # re-iterating continues where we are (no skipped or repeated batches)
    a = [next(it) for _ in range(3)]
    it2 = iter(train)
    b = [next(it2) for _ in range(3)]
    ref = loader(dataset_dir)
    rit = iter(ref)
    expected = [next(rit) for _ in range(2 * n + 6)][-6:]
    assert all(torch.equal(x, y) for x, y in zip(a + b, expected))
    # the same seed gives the same order; another seed another order
    assert rows([next(iter(loader(dataset_dir, seed=17)))]) == rows(epoch0[:1])
    assert rows([next(iter(loader(dataset_dir, seed=18)))]) != rows(epoch0[:1])


def test_resume_in_new_process_matches_uninterrupted_run(tmp_path, dataset_dir):
    """Stop after k batches, save the state (JSON), restore in a fresh process: same next batches,
    across an epoch boundary too."""
    n = len(loader(dataset_dir, micro_batch_size=3))
    k, more = n - 4, 9  # the resumed part crosses into epoch 1
    cfg = {"dataset": str(dataset_dir), "seq_len": SEQ_LEN, "mbs": 3, "seed": 5}
    ref = loader(dataset_dir, micro_batch_size=3, seed=5)
    it = iter(ref)
    uninterrupted = [next(it).tolist() for _ in range(k + more)]
    first = loader(dataset_dir, micro_batch_size=3, seed=5)
    it = iter(first)
    head = [next(it).tolist() for _ in range(k)]
    assert head == uninterrupted[:k]
    state = first.state_dict()
    assert state["epoch"] == 0 and state["sample_in_epoch"] == 3 * k
    (tmp_path / "state.json").write_text(json.dumps(state))
    (out,) = run_workers("resume", [{**cfg, "state": str(tmp_path / "state.json"), "n": more}])
    assert out["batches"] == uninterrupted[k:]
    assert out["state"]["epoch"] == 1
    # and without the state a new process starts from the beginning (the test can tell)
    (fresh,) = run_workers("resume", [{**cfg, "state": None, "n": 2}])
    assert fresh["batches"] == uninterrupted[:2] != uninterrupted[k:k + 2]


def test_state_dict_rejects_other_data(dataset_dir, tmp_path, corpus_dir):
    from megatron_ratplus.data import prepare_dataset

    other = tmp_path / "other"
    prepare_dataset([corpus_dir / "b_records.jsonl"], other, seq_len=SEQ_LEN, tokenizer=dataset_dir / "tokenizer.json",
                    val_fraction=0.2, workers=1)
    state = loader(dataset_dir).state_dict()
    with pytest.raises(ValueError, match="different data"):
        loader(other).load_state_dict(state)
    with pytest.raises(ValueError, match="split"):
        loader(dataset_dir, split="val", shuffle=False).load_state_dict(state)


def test_dataloader_workers_give_the_same_batches(dataset_dir):
    a = iter(loader(dataset_dir, seed=3))
    b = iter(loader(dataset_dir, seed=3, num_workers=2))
    for _ in range(6):
        assert torch.equal(next(a), next(b))


def test_remote_given_as_second_local_directory(tmp_path, fresh_dataset):
    remote = tmp_path / "bucket" / "ds"
    shutil.copytree(fresh_dataset, remote)
    before = sorted(p.relative_to(remote) for p in remote.rglob("*"))
    cache = tmp_path / "cache"
    streams = [{"local": None, "remote": str(remote), "proportion": None}]
    r = build_pretraining_loader(streams, split="train", seq_len=SEQ_LEN, micro_batch_size=4, dp_rank=0,
                                 dp_size=1, seed=9, cache_dir=cache)
    local = loader(fresh_dataset, seed=9)
    ri, li = iter(r), iter(local)
    for _ in range(len(local) + 2):
        assert torch.equal(next(ri), next(li))
    v = build_pretraining_loader(streams, split="val", seq_len=SEQ_LEN, micro_batch_size=4, dp_rank=0, dp_size=1,
                                 seed=9, shuffle=False, cache_dir=cache)
    assert rows(list(v)) == rows(list(loader(fresh_dataset, split="val", shuffle=False, seed=9)))
    # shards were fetched into the cache (decompressed there), the remote is untouched
    cached = {p.name for p in cache.rglob("*") if p.is_file()}
    assert {"manifest.json", "tokenizer.json", "index.json", "shard.00000.mds"} <= cached
    assert sorted(p.relative_to(remote) for p in remote.rglob("*")) == before
    assert r.manifest.tokenizer_sha256 == read_manifest(remote).tokenizer_sha256
    # a cache directory that holds another dataset's shards is refused
    other = tmp_path / "bucket" / "other"
    shutil.copytree(remote, other)
    m = json.loads((other / "manifest.json").read_text())
    m["params"] = {"changed": True}
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="different dataset"):
        build_pretraining_loader([{"remote": str(other), "local": r.manifest.path.as_posix()}], split="train",
                                 seq_len=SEQ_LEN, micro_batch_size=4, dp_rank=0, dp_size=1, seed=9)


def test_mixing_streams_by_proportion(tmp_path, dataset_dir, corpus_dir):
    from megatron_ratplus.data import prepare_dataset

    second = tmp_path / "second"
    prepare_dataset([corpus_dir / "b_records.jsonl"], second, seq_len=SEQ_LEN,
                    tokenizer=dataset_dir / "tokenizer.json", val_fraction=0.2, workers=1)
    a_samples, b_samples = set(all_samples(dataset_dir, "train")), set(all_samples(second, "train"))
    mixed = build_pretraining_loader(
        [{"local": str(dataset_dir), "proportion": 0.5}, {"local": str(second), "proportion": 0.5}],
        split="train", seq_len=SEQ_LEN, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1)
    it = iter(mixed)
    seen = rows([next(it) for _ in range(len(mixed))])
    from_a = sum(s in a_samples for s in seen)
    from_b = sum(s in b_samples for s in seen)
    assert from_a + from_b == len(seen)
    # B is ~3x smaller than A but weighted equally: it is upsampled to about half of the epoch
    assert len(b_samples) < len(a_samples) / 2
    assert abs(from_b - len(seen) / 2) <= 2
    # A changed mixture cannot resume exactly: said so (the position is kept)
    remixed = build_pretraining_loader(
        [{"local": str(dataset_dir), "proportion": 0.7}, {"local": str(second), "proportion": 0.3}],
        split="train", seq_len=SEQ_LEN, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1)
    with pytest.warns(UserWarning, match=r"stream proportions \[0.7, 0.3\] \(saved with \[0.5, 0.5\]\)"):
        remixed.load_state_dict(mixed.state_dict())
    same = build_pretraining_loader(
        [{"local": str(dataset_dir), "proportion": 0.5}, {"local": str(second), "proportion": 0.5}],
        split="train", seq_len=SEQ_LEN, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1)
    with warnings.catch_warnings():  # (building may warn about other jobs' streaming shared memory)
        warnings.simplefilter("error")
        same.load_state_dict(mixed.state_dict())
    with pytest.raises(ValueError, match="proportion for every stream"):
        build_pretraining_loader([{"local": str(dataset_dir), "proportion": 0.5}, {"local": str(second)}],
                                 split="train", seq_len=SEQ_LEN, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1)


def test_two_dp_ranks_disjoint_and_covering_and_resume(dataset_dir):
    """Two reader processes (torch.distributed world = the readers): one epoch each is disjoint and
    covers the split; both ranks resume exactly (in new processes) from the state saved mid-epoch."""
    cfg = {"dataset": str(dataset_dir), "seq_len": SEQ_LEN, "mbs": 1, "seed": 11, "n": "epoch", "extra": 4,
           "world": 2, "tp": 1, "save_after": 7}
    port = free_port()
    outs = run_workers("dist", [{**cfg, "rank": r, "port": port} for r in range(2)])
    everything = all_samples(dataset_dir, "train")
    assert len(set(everything)) == len(everything)
    epoch_len = outs[0]["epoch_len"]
    assert epoch_len == outs[1]["epoch_len"] == len(everything) // 2
    r0, r1 = (rows([torch.tensor(b) for b in o["batches"][:epoch_len]]) for o in outs)
    assert len(set(r0) | set(r1)) == 2 * epoch_len and set(r0) | set(r1) <= set(everything)
    assert not set(r0) & set(r1)  # no padding repeats (an epoch is cut to whole global batches)
    # resume both ranks from the state saved after 7 batches: the rest, across the epoch boundary
    state = outs[0]["state"]
    assert state == outs[1]["state"] and state["sample_in_epoch"] == 7 * 2
    port = free_port()
    resumed = run_workers("dist", [{**cfg, "rank": r, "port": port, "state": state, "n": epoch_len - 7,
                                    "save_after": None} for r in range(2)])
    for before, after in zip(outs, resumed):
        assert after["batches"] == before["batches"][7:]


def test_tp_ranks_of_a_replica_get_the_same_batches(dataset_dir):
    """dp=2 x tp=2 with gloo: ranks 0 and 2 read (their own reader group), 1 and 3 receive."""
    port = free_port()
    cfg = {"dataset": str(dataset_dir), "seq_len": SEQ_LEN, "mbs": 2, "seed": 4, "n": 5, "world": 4, "tp": 2,
           "port": port}
    outs = sorted(run_workers("dist", [{**cfg, "rank": r} for r in range(4)]), key=lambda o: o["rank"])
    assert [(o["dp_rank"], o["tp_rank"]) for o in outs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert outs[0]["batches"] == outs[1]["batches"]
    assert outs[2]["batches"] == outs[3]["batches"]
    assert not set(rows([torch.tensor(b) for b in outs[0]["batches"]])) & set(
        rows([torch.tensor(b) for b in outs[2]["batches"]]))
    # and the readers saw what a 2-reader loader of that rank yields
    assert len(outs[0]["batches"]) == 5 and len(outs[0]["batches"][0]) == 2


def test_loader_warns_about_many_streaming_leftovers(dataset_dir, tmp_path, monkeypatch):
    """Building a loader checks the node's streaming shared memory first, and warns when many
    prefixes are left (fake /dev/shm with 3 prefixes against a threshold of 2)."""
    from megatron_ratplus.data import housekeeping

    for i in range(3):
        (tmp_path / f"{900000 + i:06d}_locals").write_text("")
    monkeypatch.setattr(housekeeping, "SHM_DIR", tmp_path)
    monkeypatch.setattr(housekeeping, "MANY_PREFIXES", 2)
    with pytest.warns(RuntimeWarning, match="3 prefixes of mosaicml-streaming shared memory"):
        ld = loader(dataset_dir)
    assert next(iter(ld)).shape == (4, SEQ_LEN + 1)              # and the loader works


def test_broadcast_batch_argument_checks():
    x = torch.arange(6).reshape(2, 3)
    assert torch.equal(broadcast_batch(x, src=0, group=None, shape=(2, 3), device="cpu"), x)
    with pytest.raises(ValueError, match="no batch"):
        broadcast_batch(None, src=0, group=None, shape=(2, 3), device="cpu")
    with pytest.raises(ValueError, match="shape"):
        broadcast_batch(x, src=0, group=None, shape=(3, 2), device="cpu")


def test_reader_layout_argument_checks(dataset_dir, fresh_dataset):
    with pytest.raises(ValueError, match="dp_rank"):
        loader(dataset_dir, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="torch.distributed"):
        loader(dataset_dir, dp_rank=1, dp_size=2)  # two readers on one node need a process group
    with pytest.raises(ValueError, match="evenly"):
        loader(dataset_dir, dp_rank=0, dp_size=4, readers_per_node=3)
    # several nodes must not decompress a shared dataset in place at once
    with pytest.raises(ValueError, match="compressed shards"):
        loader(fresh_dataset, dp_rank=0, dp_size=2, readers_per_node=1)
    everything = set(all_samples(fresh_dataset, "train"))  # (this decompresses the shards)
    # readers alone on their nodes need no process group: they partition by dp_rank alone
    parts = []
    for r in range(2):
        ld = loader(fresh_dataset, dp_rank=r, dp_size=2, readers_per_node=1, micro_batch_size=1)
        assert ld.state_dict()["num_canonical_nodes"] == 2  # default: the nodes of the first run
        it = iter(ld)
        parts.append(rows([next(it) for _ in range(len(ld))]))
    assert set(parts[0]) | set(parts[1]) <= everything and len(everything) - len(set(parts[0]) | set(parts[1])) < 2
    assert not set(parts[0]) & set(parts[1])


def test_a_missing_or_unreadable_shard_is_named_before_reading(dataset_dir, tmp_path):
    """An incomplete copy of a dataset read in place fails when the loader is built, naming the file."""
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    index = json.loads((copy / "train" / "index.json").read_text())
    third = index["shards"][min(2, len(index["shards"]) - 1)]
    for meta in (third.get("raw_data"), third.get("zip_data")):
        if meta and (copy / "train" / meta["basename"]).exists():
            (copy / "train" / meta["basename"]).unlink()
    with pytest.raises(ValueError, match=rf"shard {third['raw_data']['basename']}.* of the 'train' split is "
                                         rf"missing \(listed in .*index.json\)"):
        loader(copy)
    (copy / "val" / "index.json").write_text("{")
    with pytest.raises(ValueError, match="val/index.json cannot be read as a shard index"):
        loader(copy, split="val", shuffle=False)


def test_resume_takes_seed_and_canonical_nodes_from_the_state(dataset_dir):
    """The order is the saved run's: a resumed loader built with another seed and another
    num_canonical_nodes (e.g. a changed config, or a run moved to another node count) continues
    exactly where the saved one stopped."""
    first = loader(dataset_dir, micro_batch_size=2, seed=5, num_canonical_nodes=2)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [next(it) for _ in range(6)]
    resumed = loader(dataset_dir, micro_batch_size=2, seed=99)
    resumed.load_state_dict(state)
    got = list(itertools.islice(iter(resumed), 6))
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == 6
    assert (resumed.state_dict()["shuffle_seed"], resumed.state_dict()["num_canonical_nodes"]) == (5, 2)


def test_state_dict_rejects_another_order_or_format(dataset_dir):
    state = loader(dataset_dir).state_dict()
    with pytest.raises(ValueError, match="shuffle=True, this loader shuffle=False"):
        loader(dataset_dir, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="version 2 is not 1"):
        loader(dataset_dir).load_state_dict({**state, "version": 2})
    with pytest.raises(ValueError, match="seq_len 64, this loader reads 'train' / seq_len 32"):
        loader(dataset_dir).load_state_dict({**state, "seq_len": 64})


def test_validation_starts_from_the_beginning_after_a_partial_pass(dataset_dir):
    """An evaluation reads only the first batches of the validation split; the next one reads the
    same batches again (the split's first samples in storage order), not the ones after them."""
    val = loader(dataset_dir, split="val", shuffle=False)
    it = iter(val)
    partial = [next(it) for _ in range(2)]
    again = list(val)
    assert len(again) == len(val) > 2
    assert rows(partial) == rows(again[:2]) == all_samples(dataset_dir, "val")[:8]


def test_streams_of_different_tokenizers_are_not_mixed(fresh_dataset, dataset_dir):
    """Same seq_len and dtype, another tokenizer (its sha256 in the manifest): refused when built."""
    m = json.loads((fresh_dataset / "manifest.json").read_text())
    m["tokenizer"]["sha256"] = "0" * 64
    (fresh_dataset / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="tokenised differently .*mixed streams must share one tokenizer"):
        build_pretraining_loader([{"local": str(dataset_dir), "proportion": 0.5},
                                  {"local": str(fresh_dataset), "proportion": 0.5}], split="train",
                                 seq_len=SEQ_LEN, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1)


def test_resume_on_a_node_count_the_canonical_nodes_do_not_divide(fresh_dataset):
    """2 nodes -> 3 nodes at the same global batch (2 x 3 = 3 x 2 samples): 2 canonical nodes do
    not divide 3, so streaming's relaxed partition rebuilds the first run's partition from its node
    count (initial_physical_nodes, kept in the loader state) and continues the same global order."""
    all_samples(fresh_dataset, "train")     # decompress once: several nodes then read in place
    first = [loader(fresh_dataset, dp_rank=r, dp_size=2, readers_per_node=1, micro_batch_size=3) for r in range(2)]
    its = [iter(ld) for ld in first]
    for _ in range(2):
        for it in its:
            next(it)
    state = json.loads(json.dumps(first[0].state_dict()))
    assert state == first[1].state_dict() and state["initial_physical_nodes"] == 2
    expected = [set(rows([next(it) for it in its])) for _ in range(3)]       # global batches
    for ld in first:
        ld.close()
    resumed = [loader(fresh_dataset, dp_rank=r, dp_size=3, readers_per_node=1, micro_batch_size=2) for r in range(3)]
    for ld in resumed:
        ld.load_state_dict(state)
    its = [iter(ld) for ld in resumed]
    got = [set(rows([next(it) for it in its])) for _ in range(3)]
    assert got == expected and all(len(g) == 6 for g in got)


def test_validation_reads_the_first_samples_on_any_number_of_nodes(fresh_dataset):
    """An evaluation reads the split's first eval_iters x global_batch_size samples (storage order)
    whatever the number of nodes: with one canonical node per physical node, two nodes read from
    both halves of the split (samples 0, 1, N/2, N/2 + 1, ...), so the validation set changed with
    the node count, also when a run was resumed on another number of nodes."""
    everything = all_samples(fresh_dataset, "val")      # (decompresses: two nodes then read in place)
    per_rank = []
    for r in range(2):
        ld = loader(fresh_dataset, split="val", shuffle=False, dp_rank=r, dp_size=2, readers_per_node=1,
                    micro_batch_size=2)
        per_rank.append([b.tolist() for b in ld])
        ld.close()
    assert len(per_rank[0]) == len(per_rank[1]) == len(everything) // 4 > 1
    steps = [sorted(tuple(row) for batches in per_rank for row in batches[k]) for k in range(len(per_rank[0]))]
    assert steps == [sorted(everything[4 * k:4 * k + 4]) for k in range(len(steps))]
