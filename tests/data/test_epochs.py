"""Epochs and global batches do not depend on the data-parallel layout.

A dataset whose sample count is odd and not a multiple of the global batch: every layout (one
reader or two, micro batches of 1 or 2, readers on one node or on two) must give the same samples
in every optimizer step, across epoch boundaries and across a resume at another layout; no step
may repeat a sample or mix two epochs.
"""
from __future__ import annotations

import json
import warnings

import pytest

from megatron_ratplus.data import build_pretraining_loader, prepare_dataset

from .conftest import SEQ_LEN, free_port, run_workers

GBS = 4
SEED = 23


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory, corpus_dir, dataset_dir):
    """Uncompressed (two simulated nodes may read it in place), odd sample count."""
    out = tmp_path_factory.mktemp("odd") / "ds"
    files = sorted(corpus_dir.glob("a_*.txt"))[:10]
    prepare_dataset(files, out, seq_len=SEQ_LEN, tokenizer=dataset_dir / "tokenizer.json", val_fraction=0,
                    workers=1, compression=None)
    return out


def make(path, *, dp_rank=0, dp_size=1, mbs, **kw):
    return build_pretraining_loader(str(path), split="train", seq_len=SEQ_LEN, micro_batch_size=mbs,
                                    dp_rank=dp_rank, dp_size=dp_size, seed=SEED, global_batch_size=GBS, **kw)


def take(loader, n):
    it = iter(loader)
    return [next(it).tolist() for _ in range(n)]


def steps(per_rank: list[list], mbs: int) -> list[list[tuple]]:
    """The sorted samples of each optimizer step, from every reader's micro batches."""
    accum = GBS // (mbs * len(per_rank))
    n = min(len(b) for b in per_rank) // accum
    return [sorted(tuple(row) for batches in per_rank for b in batches[k * accum:(k + 1) * accum] for row in b)
            for k in range(n)]


def test_global_batches_and_epochs_do_not_depend_on_the_layout(odd_dataset):
    ref_loader = make(odd_dataset, mbs=2)
    n = ref_loader.num_samples
    assert n % 2 == 1 and n % GBS, n                     # streaming would pad at dp=2; a partial step
    per_epoch = n // GBS
    assert ref_loader.samples_per_epoch == per_epoch * GBS and len(ref_loader) == per_epoch * 2
    total = 2 * per_epoch + 4                             # two epochs and part of a third
    ref = steps([take(ref_loader, total * 2)], 2)
    assert len(ref) == total and ref_loader.epoch == 2
    for e in range(3):                                    # every epoch: distinct samples, steps not mixed
        epoch = [s for step in ref[e * per_epoch:(e + 1) * per_epoch] for s in step]
        assert len(set(epoch)) == len(epoch) == len(ref[e * per_epoch:(e + 1) * per_epoch]) * GBS
    assert ref[:per_epoch] != ref[per_epoch:2 * per_epoch]  # reshuffled

    # one reader with micro batches of 1
    assert steps([take(make(odd_dataset, mbs=1), total * 4)], 1) == ref
    # two readers on one node (gloo processes), micro batches of 1, state saved mid-epoch 2
    save = per_epoch + 3
    cfg = {"dataset": str(odd_dataset), "seq_len": SEQ_LEN, "mbs": 1, "seed": SEED, "gbs": GBS, "n": total * 2,
           "world": 2, "tp": 1, "save_after": save * 2}
    port = free_port()
    outs = run_workers("dist", [{**cfg, "rank": r, "port": port} for r in range(2)])
    assert steps([o["batches"] for o in outs], 1) == ref
    # two readers on two nodes (one process after the other), micro batches of 2: the same order
    # for the same num_canonical_nodes
    two_nodes = [take(make(odd_dataset, dp_rank=r, dp_size=2, mbs=2, readers_per_node=1, num_canonical_nodes=1),
                      total) for r in range(2)]
    assert steps(two_nodes, 2) == ref

    # resume the dp=2 state at dp=1 with micro batches of 1: exactly the rest, no warning
    state = outs[0]["state"]
    assert state == outs[1]["state"] and (state["epoch"], state["sample_in_epoch"]) == (1, 3 * GBS)
    resumed = make(odd_dataset, mbs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(json.loads(json.dumps(state)))
    assert steps([take(resumed, (total - save) * 4)], 1) == ref[save:]
    # and a dp=1 state resumed by two gloo readers
    first = make(odd_dataset, mbs=2)
    take(first, save * 2)
    port = free_port()
    outs = run_workers("dist", [{**cfg, "rank": r, "port": port, "state": first.state_dict(),
                                 "n": (total - save) * 2, "save_after": None} for r in range(2)])
    assert steps([o["batches"] for o in outs], 1) == ref[save:]


def test_global_batch_size_checks(odd_dataset):
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        build_pretraining_loader(str(odd_dataset), split="train", seq_len=SEQ_LEN, micro_batch_size=3, dp_rank=0,
                                 dp_size=1, seed=SEED, global_batch_size=GBS)
    state = make(odd_dataset, mbs=2).state_dict()
    other = build_pretraining_loader(str(odd_dataset), split="train", seq_len=SEQ_LEN, micro_batch_size=2,
                                     dp_rank=0, dp_size=1, seed=SEED, global_batch_size=2 * GBS)
    with pytest.warns(UserWarning, match="global_batch_size=8 .saved with 4.*end of every epoch differ"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="too few for one global batch of 64"):
        next(iter(build_pretraining_loader(str(odd_dataset), split="train", seq_len=SEQ_LEN, micro_batch_size=2,
                                           dp_rank=0, dp_size=1, seed=SEED, global_batch_size=64)))


@pytest.mark.parametrize("ncn", [5, 7])
def test_an_epoch_stops_before_streamings_padding(odd_dataset, ncn):
    """With a num_canonical_nodes that does not divide the sample count, streaming pads every canonical
    node's share with repeats; an epoch ends before the first repeat (whole global batches of distinct
    samples), and the next epoch follows at once."""
    ld = make(odd_dataset, mbs=2, num_canonical_nodes=ncn)
    n = ld.num_samples
    assert n % ncn and n // GBS > (n - ncn) // GBS  # whole global batches would reach into the padding
    it = iter(ld)
    epoch = [tuple(r) for _ in range(len(ld)) for r in next(it).tolist()]
    assert len(set(epoch)) == len(epoch) and len(epoch) % GBS == 0 and len(epoch) > n - ncn - GBS
    assert ld.epoch == 0 and next(it).shape == (2, SEQ_LEN + 1) and ld.epoch == 1


def test_a_state_saved_on_two_nodes_resumes_on_one(odd_dataset):
    """Readers on two nodes (one each) save mid-epoch; one reader on one node continues with exactly
    the samples the two-node run would have used in each following step."""
    save, more = 3, 5
    two = [make(odd_dataset, dp_rank=r, dp_size=2, mbs=1, readers_per_node=1, num_canonical_nodes=2)
           for r in range(2)]
    its = [iter(ld) for ld in two]
    for _ in range(save * 2):
        for it in its:
            next(it)
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["sample_in_epoch"] == save * GBS
    expected = steps([[next(it).tolist() for _ in range(more * 2)] for it in its], 1)
    resumed = make(odd_dataset, mbs=2)
    resumed.load_state_dict(state)
    assert steps([take(resumed, more * 2)], 2) == expected
