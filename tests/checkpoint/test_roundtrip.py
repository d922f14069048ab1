"""Save -> load in one process restores everything, and training continues exactly."""
import random

import numpy as np
import pytest
import torch

from megatron_ratplus.checkpoint import CheckpointManager
from megatron_ratplus.checkpoint.paths import read_tracker

from .helpers import (
    build,
    build_distributed_optimizer,
    model_weights,
    optimizer_states,
    run_config,
    train_step,
)

MODES = ["sparse", "dense", "sparse", "dense", "sparse"]


def rng_draws():
    return torch.rand(4), random.random(), float(np.random.rand())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(tmp_path, megatron_world, precision):
    cfg = run_config(precision=precision)
    objs = build(cfg)
    for s in range(2):
        train_step(objs, s, MODES[s])
    train_state = {"step": 2, "consumed_tokens": 2 * 4 * 16, "run_config": cfg.to_dict(),
                   "model_args": objs.model_args.to_dict(),
                   "data": {"epoch": 0, "sample_in_epoch": np.int64(8), "shuffle_seed": 9}}
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(2, objs.model, objs.optimizer, objs.scheduler, train_state)
    assert read_tracker(tmp_path / "ckpt") == (2, None)

    saved_weights = model_weights(objs)
    saved_optim = optimizer_states(objs)
    saved_sched = objs.scheduler.state_dict()
    ref_draws = rng_draws()
    reference = [train_step(objs, s, MODES[s]) for s in range(2, 5)]

    fresh = build(cfg)
    probe = "0.output_layer.weight"
    assert not torch.equal(model_weights(fresh)[probe], saved_weights[probe])
    state = CheckpointManager(tmp_path / "ckpt").load("latest", fresh.model, fresh.optimizer, fresh.scheduler)

    assert state["step"] == 2 and state["consumed_tokens"] == 128
    assert state["data"] == train_state["data"] and state["run_config"] == train_state["run_config"]
    loaded_weights = model_weights(fresh)
    assert loaded_weights.keys() == saved_weights.keys()
    for k in saved_weights:
        assert torch.equal(loaded_weights[k], saved_weights[k]), k
    loaded_optim = optimizer_states(fresh)
    assert len(loaded_optim) == len(saved_optim) and len(saved_optim) > 0
    for got, want in zip(loaded_optim, saved_optim):
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(torch.as_tensor(got[k]), torch.as_tensor(want[k])), k
    assert fresh.scheduler.state_dict() == saved_sched
    got_draws = rng_draws()
    assert torch.equal(got_draws[0], ref_draws[0]) and got_draws[1:] == ref_draws[1:]

    resumed = [train_step(fresh, s, MODES[s]) for s in range(2, 5)]
    assert resumed == reference


def test_model_parallel_rng_tracker_is_restored(tmp_path, megatron_world):
    """Megatron's model-parallel RNG streams (dropout inside TP regions, initialisation) continue
    from where the save left them, like the Python/NumPy/torch generators."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    tracker = get_cuda_rng_tracker()
    objs = build(run_config())
    train_step(objs, 0)
    saved = {k: v.clone() for k, v in tracker.get_states().items()}
    assert "model-parallel-rng" in saved
    CheckpointManager(tmp_path / "ckpt").save(1, objs.model, objs.optimizer, objs.scheduler, {"step": 1})
    # the streams move on after the save (another seed stands for draws made since)
    tracker.set_states({k: torch.Generator().manual_seed(99 + i).get_state() for i, k in enumerate(saved)})
    assert not torch.equal(tracker.get_states()["model-parallel-rng"], saved["model-parallel-rng"])
    CheckpointManager(tmp_path / "ckpt").load("latest", objs.model, objs.optimizer, objs.scheduler)
    restored = tracker.get_states()
    assert restored.keys() == saved.keys()
    for k in saved:
        assert torch.equal(restored[k], saved[k]), k


def test_async_save_completes_on_finalize(tmp_path, megatron_world):
    """Background saves: the tracker moves only when a save is finalized (by the next save or
    finalize()), and the result loads exactly like a synchronous save."""
    cfg = run_config()
    objs = build(cfg)
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=1, async_save=True)
    train_step(objs, 0)
    mgr.save(1, objs.model, objs.optimizer, objs.scheduler, {"step": 1})
    assert mgr.pending_saves == [1]
    train_step(objs, 1)
    mgr.save(2, objs.model, objs.optimizer, objs.scheduler, {"step": 2})
    # Saving 2 first completed 1 (tracker, retention); 2 is still pending.
    assert mgr.pending_saves == [2]
    assert read_tracker(tmp_path / "ckpt") == (1, None)
    saved = model_weights(objs)
    reference = [train_step(objs, s) for s in (2, 3)]
    mgr.finalize()
    assert mgr.pending_saves == []
    assert read_tracker(tmp_path / "ckpt") == (2, None)
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("iter_"))
    assert kept == ["iter_0000002"]

    fresh = build(cfg)
    assert mgr.load("latest", fresh.model, fresh.optimizer, fresh.scheduler)["step"] == 2
    for k, v in model_weights(fresh).items():
        assert torch.equal(v, saved[k]), k
    assert [train_step(fresh, s) for s in (2, 3)] == reference


@pytest.mark.parametrize("precision,distributed", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_a_checkpoint_saved_before_the_first_update_resumes_exactly(tmp_path, megatron_world, precision,
                                                                     distributed):
    """Adam creates its moments at the first update: a checkpoint saved before one (the first update
    skipped for a non-finite gradient, then a preemption) holds none. It resumes with a fresh
    optimizer on its weights, which is the state it was saved in; it used to be refused as lacking
    ``optimizer.state.exp_avg``."""
    cfg = run_config(precision=precision)
    build_objects = build_distributed_optimizer if distributed else build    # (CPU mode builds the plain one)
    objs = build_objects(cfg)
    train_state = {"step": 1, "consumed_tokens": 64, "run_config": cfg.to_dict(),
                   "model_args": objs.model_args.to_dict(), "data": {}}
    CheckpointManager(tmp_path / "ckpt").save(1, objs.model, objs.optimizer, objs.scheduler, train_state)
    reference = [train_step(objs, s, MODES[s]) for s in range(1, 4)]

    fresh = build_objects(cfg)
    state = CheckpointManager(tmp_path / "ckpt").load("latest", fresh.model, fresh.optimizer, fresh.scheduler)
    assert state["step"] == 1
    assert [train_step(fresh, s, MODES[s]) for s in range(1, 4)] == reference
    want, got = model_weights(objs), model_weights(fresh)
    assert all(torch.equal(got[k], want[k]) for k in want)
