"""Broken checkpoints are detected; 'latest' falls back; nothing is overwritten; retention is safe;
architecture mismatches are refused with every difference listed."""
import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ratplus.checkpoint import CheckpointError, CheckpointManager, checkpoint_problems
from megatron_ratplus.checkpoint.architecture import unwrap_model
from megatron_ratplus.checkpoint.paths import TRACKER_NAME, read_tracker, write_tracker
from megatron_ratplus.checkpoint.retention import select_for_deletion

from .helpers import build, run_config, train_and_save

PROBE = "output_layer.weight"


def probe(objs):
    return unwrap_model(objs.model[0]).state_dict()[PROBE].detach().clone()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, megatron_world):
    """A save_dir with complete checkpoints at steps 1, 2, 3 and the probe weight of each."""
    save_dir = tmp_path_factory.mktemp("integrity") / "ckpt"
    objs = build(run_config())
    weights = {}

    def record(step):
        weights[step] = probe(objs)

    train_and_save(objs, save_dir, after_save=record)
    assert len({tuple(w.flatten()[:8].tolist()) for w in weights.values()}) == 3
    return save_dir, weights, objs


@pytest.fixture
def copy(saved, tmp_path):
    save_dir, weights, objs = saved
    target = tmp_path / "ckpt"
    shutil.copytree(save_dir, target)
    return target, weights, objs


def load_latest(save_dir, objs):
    return CheckpointManager(save_dir).load("latest", objs.model)


def biggest_shard(ckpt: Path) -> Path:
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


def truncate(path: Path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def cut_last_byte(path: Path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)


def drop_common_key(ckpt: Path, key: str):
    common = torch.load(ckpt / "common.pt", weights_only=False)
    del common[key]
    torch.save(common, ckpt / "common.pt")


CORRUPTIONS = {
    "no-metadata": (lambda ckpt: (ckpt / "metadata.json").unlink(), "metadata.json is missing"),
    "truncated-shard": (lambda ckpt: truncate(biggest_shard(ckpt)), "is truncated"),
    "no-common": (lambda ckpt: (ckpt / "common.pt").unlink(), "common.pt"),
    "no-index": (lambda ckpt: (ckpt / ".metadata").unlink(), "tensor index .metadata is missing"),
    "garbled-common": (lambda ckpt: (ckpt / "common.pt").write_bytes(b"not a pickle"),
                       "common.pt is unreadable"),
    # a write cut short by a few bytes (disk full at the very end of a shard)
    "shard-short-by-one-byte": (lambda ckpt: cut_last_byte(biggest_shard(ckpt)), "is truncated"),
    # a Megatron-LM (or other) checkpoint, not one of ours
    "foreign-common": (lambda ckpt: drop_common_key(ckpt, "ratplus"), "not a megatron-ratplus checkpoint"),
    "other-backend": (lambda ckpt: (ckpt / "metadata.json").write_text('{"sharded_backend": "zarr"}'),
                      "only 'torch_dist'"),
}


def test_complete_checkpoints_pass(saved):
    save_dir, _, _ = saved
    for step in (1, 2, 3):
        assert checkpoint_problems(save_dir / f"iter_{step:07d}") == []


def test_latest_loads_newest(copy):
    save_dir, weights, objs = copy
    assert load_latest(save_dir, objs)["step"] == 3
    assert torch.equal(probe(objs), weights[3])


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_broken_latest_falls_back_with_warning(copy, caplog, kind):
    save_dir, weights, objs = copy
    corrupt, message = CORRUPTIONS[kind]
    corrupt(save_dir / "iter_0000003")
    with caplog.at_level(logging.WARNING, logger="megatron_ratplus.checkpoint"):
        state = load_latest(save_dir, objs)
    assert state["step"] == 2
    assert torch.equal(probe(objs), weights[2])
    text = caplog.text
    assert "iter_0000003" in text and message in text and "falling back" in text


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_broken_explicit_path_is_an_error(copy, kind):
    save_dir, weights, objs = copy
    corrupt, message = CORRUPTIONS[kind]
    ckpt = save_dir / "iter_0000003"
    corrupt(ckpt)
    before = probe(objs).clone()
    with pytest.raises(CheckpointError, match="incomplete or corrupt") as err:
        CheckpointManager(save_dir).load(str(ckpt), objs.model)
    assert message in str(err.value) and str(ckpt) in str(err.value)
    assert torch.equal(probe(objs), before)  # nothing was loaded


def test_missing_explicit_path_is_an_error(tmp_path, saved):
    _, _, objs = saved
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointManager(tmp_path).load(str(tmp_path / "iter_0000042"), objs.model)


def test_every_checkpoint_broken_is_an_error(copy):
    save_dir, _, objs = copy
    for step in (1, 2, 3):
        (save_dir / f"iter_{step:07d}" / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint") as err:
        load_latest(save_dir, objs)
    for step in (1, 2, 3):
        assert f"iter_{step:07d}" in str(err.value)


def test_tracker_naming_a_deleted_checkpoint_falls_back(copy, caplog):
    save_dir, weights, objs = copy
    shutil.rmtree(save_dir / "iter_0000003")
    with caplog.at_level(logging.WARNING, logger="megatron_ratplus.checkpoint"):
        assert load_latest(save_dir, objs)["step"] == 2
    assert "does not exist" in caplog.text


def test_checkpoint_newer_than_tracker_is_not_used(copy, caplog):
    save_dir, weights, objs = copy
    write_tracker(save_dir, 2)
    with caplog.at_level(logging.WARNING, logger="megatron_ratplus.checkpoint"):
        assert load_latest(save_dir, objs)["step"] == 2
    assert "ignoring iter_0000003" in caplog.text


def test_fresh_start_returns_none(tmp_path, saved):
    _, _, objs = saved
    assert CheckpointManager(tmp_path / "never-created").load("latest", objs.model) is None
    (tmp_path / "empty").mkdir()
    assert CheckpointManager(tmp_path / "empty").load("latest", objs.model) is None


def test_only_unfinished_saves_start_fresh_with_warning(copy, caplog):
    save_dir, _, objs = copy
    for step in (1, 2):
        shutil.rmtree(save_dir / f"iter_{step:07d}")
    (save_dir / "iter_0000003" / "metadata.json").unlink()
    (save_dir / TRACKER_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="megatron_ratplus.checkpoint"):
        assert load_latest(save_dir, objs) is None
    assert "starting from scratch" in caplog.text


def tree_digest(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_existing_checkpoint_is_never_overwritten(copy):
    save_dir, _, objs = copy
    ckpt = save_dir / "iter_0000002"
    before = tree_digest(ckpt)
    with pytest.raises(CheckpointError, match="already exists"):
        CheckpointManager(save_dir).save(2, objs.model, objs.optimizer, objs.scheduler, {"step": 2})
    assert tree_digest(ckpt) == before
    assert read_tracker(save_dir) == (3, None)


def test_save_behind_the_tracked_complete_checkpoint_is_refused(copy):
    """A rollback into the same save_dir must not move ``latest`` back behind a complete save."""
    save_dir, _, objs = copy
    shutil.rmtree(save_dir / "iter_0000002")
    with pytest.raises(CheckpointError, match="names the complete checkpoint .*iter_0000003.*another timeline"):
        CheckpointManager(save_dir).save(2, objs.model, objs.optimizer, objs.scheduler, {"step": 2})
    assert not (save_dir / "iter_0000002").exists()
    assert read_tracker(save_dir) == (3, None)


def test_save_behind_a_tracker_whose_checkpoint_was_removed_moves_it_back(copy):
    """Rolling back by deleting the newer checkpoints: the tracker then names nothing to protect."""
    save_dir, _, objs = copy
    for step in (2, 3):
        shutil.rmtree(save_dir / f"iter_{step:07d}")
    CheckpointManager(save_dir).save(2, objs.model, objs.optimizer, objs.scheduler, {"step": 2})
    assert read_tracker(save_dir) == (2, None)


def test_a_run_resuming_behind_complete_checkpoints_is_refused_at_start(copy):
    from megatron_ratplus.training.config import ConfigError
    from megatron_ratplus.training.run import _refuse_newer_checkpoints
    save_dir, _, _ = copy
    cfg = run_config(extra=[f"checkpoint.save_dir={save_dir}", f"checkpoint.load={save_dir / 'iter_0000001'}"])
    with pytest.raises(ConfigError, match=r"newer than step 1 .*\(iter_0000002, iter_0000003\).*Move them"):
        _refuse_newer_checkpoints(cfg, 1)
    _refuse_newer_checkpoints(cfg, 3)
    (save_dir / "iter_0000003" / "metadata.json").unlink()    # an unfinished save does not count
    _refuse_newer_checkpoints(cfg, 2)


def test_incomplete_directory_is_set_aside_not_overwritten(copy, caplog):
    save_dir, _, objs = copy
    ckpt = save_dir / "iter_0000003"
    (ckpt / "metadata.json").unlink()
    before = tree_digest(ckpt)
    with caplog.at_level(logging.WARNING, logger="megatron_ratplus.checkpoint"):
        CheckpointManager(save_dir).save(3, objs.model, objs.optimizer, objs.scheduler, {"step": 3})
    aside = [p for p in save_dir.iterdir() if p.name.startswith("iter_0000003.incomplete-")]
    assert len(aside) == 1 and tree_digest(aside[0]) == before
    assert checkpoint_problems(ckpt) == []
    assert "moved it to" in caplog.text


def test_a_save_that_fails_verification_moves_neither_the_tracker_nor_retention(copy, monkeypatch):
    """A writer that lost the end of a shard (disk full): the save is an error, ``latest`` still
    names the previous complete checkpoint, and retention deleted none of the older ones."""
    from megatron_ratplus.checkpoint import manager as manager_module
    save_dir, weights, objs = copy
    real_save = manager_module.dist_checkpointing.save

    def save_losing_bytes(sharded, ckpt_dir, **kwargs):
        result = real_save(sharded, ckpt_dir, **kwargs)
        truncate(biggest_shard(Path(ckpt_dir)))
        return result

    monkeypatch.setattr(manager_module.dist_checkpointing, "save", save_losing_bytes)
    with pytest.raises(CheckpointError, match="iter_0000004 failed verification"):
        CheckpointManager(save_dir, keep_last=1).save(4, objs.model, objs.optimizer, objs.scheduler, {"step": 4})
    monkeypatch.undo()
    assert read_tracker(save_dir) == (3, None)
    assert [p.name for p in sorted(save_dir.glob("iter_*"))] == [f"iter_000000{i}" for i in (1, 2, 3, 4)]
    assert load_latest(save_dir, objs)["step"] == 3
    assert torch.equal(probe(objs), weights[3])


def test_retention_keeps_newest_and_never_touches_others(tmp_path, saved):
    source, _, objs = saved
    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    # An unfinished save (must survive) and a later-iteration checkpoint (another timeline).
    shutil.copytree(source / "iter_0000001", save_dir / "iter_0000002")
    (save_dir / "iter_0000002" / "metadata.json").unlink()
    shutil.copytree(source / "iter_0000003", save_dir / "iter_0000009")
    mgr = CheckpointManager(save_dir, keep_last=2)
    for step in (3, 4, 5, 6):
        mgr.save(step, objs.model, objs.optimizer, objs.scheduler, {"step": step})
    names = sorted(p.name for p in save_dir.iterdir() if p.name.startswith("iter_"))
    assert names == ["iter_0000002", "iter_0000005", "iter_0000006", "iter_0000009"]
    assert read_tracker(save_dir) == (6, None)
    assert not [p for p in save_dir.iterdir() if p.name.startswith(".deleting")]

    # keep_last=1 keeps exactly the checkpoint just saved.
    assert [p.name for p in select_for_deletion(save_dir, 6, 1)] == ["iter_0000005"]
    assert select_for_deletion(save_dir, 6, None) == []


def test_bad_keep_last_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def other_model(**overrides):
    from megatron_ratplus.model import RATPlusModelArgs, build_gpt_model, to_transformer_config
    values = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=100, max_seq_len=16,
                  dilation=4, local_window=1, initial_tokens=1)
    values.update(overrides)
    args = RATPlusModelArgs(**values)
    cfg = to_transformer_config(args, use_cpu_initialization=True, kernel_backend="reference")
    return [build_gpt_model(args, cfg, spec="local")], args


def test_architecture_mismatch_lists_every_difference(saved):
    save_dir, _, _ = saved
    chunks, args = other_model(num_layers=2, hidden_size=128, vocab_size=300, recurrence=False)
    with pytest.raises(CheckpointError, match="does not match the model") as err:
        CheckpointManager(save_dir).load("latest", chunks, model_args=args)
    text = str(err.value)
    for line in ("num_layers: checkpoint 4 vs model 2", "hidden_size: checkpoint 64 vs model 128",
                 "vocab_size: checkpoint 100 vs model 300", "padded_vocab_size: checkpoint 128 vs model 384",
                 "recurrence: checkpoint True vs model False",
                 "ffn_hidden_size: checkpoint 256 vs model 512"):
        assert line in text, text
    assert "dilation" not in text


def test_same_shapes_other_function_is_refused(saved):
    """Differences that leave every tensor shape alone (norm epsilon) or that only the FFN's
    meaning shows (gelu vs SwiGLU) must not load silently."""
    save_dir, _, _ = saved
    chunks, args = other_model(norm_eps=1e-5)
    with pytest.raises(CheckpointError, match=r"norm_eps: checkpoint 1e-06 vs model 1e-05"):
        CheckpointManager(save_dir).load("latest", chunks, model_args=args)
    chunks, args = other_model(ffn_type="swiglu")
    with pytest.raises(CheckpointError, match=r"ffn_type: checkpoint 'gelu' vs model 'swiglu'"):
        CheckpointManager(save_dir).load("latest", chunks, model_args=args)


def test_checkpoint_lacking_a_tensor_the_model_needs_is_a_clear_error(copy):
    """An index without one of the model's tensors (a checkpoint of another model variant, a
    damaged copy) is a CheckpointError naming the tensor, and nothing is loaded."""
    import pickle

    from megatron_ratplus.checkpoint.validate import read_dcp_index
    save_dir, _, objs = copy
    ckpt = save_dir / "iter_0000003"
    index = read_dcp_index(ckpt)
    del index.state_dict_metadata[PROBE]
    (ckpt / ".metadata").write_bytes(pickle.dumps(index))
    before = probe(objs).clone()
    with pytest.raises(CheckpointError, match=f"lacks tensors the model needs: {PROBE}"):
        CheckpointManager(save_dir).load(str(ckpt), objs.model)
    assert torch.equal(probe(objs), before)


def test_checkpoint_of_a_newer_format_is_refused(copy):
    save_dir, _, objs = copy
    ckpt = save_dir / "iter_0000003"
    common = torch.load(ckpt / "common.pt", weights_only=False)
    common["ratplus"]["format_version"] += 1
    torch.save(common, ckpt / "common.pt")
    before = probe(objs).clone()
    with pytest.raises(CheckpointError, match="newer than this code understands"):
        CheckpointManager(save_dir).load(str(ckpt), objs.model)
    assert torch.equal(probe(objs), before)


def test_unpadded_vocab_difference_is_caught(saved):
    save_dir, _, _ = saved
    chunks, args = other_model(vocab_size=120)   # same padded size (128): loadable, but wrong
    with pytest.raises(CheckpointError, match="vocab_size: checkpoint 100 vs model 120"):
        CheckpointManager(save_dir).load("latest", chunks, model_args=args)


def test_sparse_pattern_difference_is_allowed_and_logged(saved, caplog):
    save_dir, weights, _ = saved
    chunks, args = other_model(dilation=16, local_window=8, initial_tokens=2, attention_mode="sparse")
    with caplog.at_level(logging.INFO, logger="megatron_ratplus.checkpoint"):
        state = CheckpointManager(save_dir).load("latest", chunks, model_args=args)
    assert state["step"] == 3
    assert torch.equal(chunks[0].state_dict()[PROBE], weights[3])
    assert "dilation: checkpoint 4 (all layers) vs model 16 (all layers)" in caplog.text
    assert "attention_mode" in caplog.text


def test_resuming_with_another_lr_schedule_follows_lr_schedule_on_resume(saved):
    """strict (default) lists every difference before reading anything; config / checkpoint pick."""
    from megatron_ratplus.training.setup import build_training_objects

    from .helpers import SEQ, VOCAB
    save_dir = saved[0]

    def resume(policy):
        cfg = run_config(extra=["train.lr=1e-3", f"checkpoint.lr_schedule_on_resume={policy}"])
        objs = build_training_objects(cfg, cfg.model.model_args(vocab_size=VOCAB, seq_len=SEQ), 40)
        CheckpointManager(save_dir).load("latest", objs.model, objs.optimizer, objs.scheduler)
        return objs.scheduler

    with pytest.raises(CheckpointError) as err:
        resume("strict")
    message = str(err.value)
    for line in ("max_lr: checkpoint 0.003, this run 0.001", "lr_decay_steps: checkpoint 20, this run 40",
                 "lr_warmup_steps: checkpoint 2, this run 4", "lr_schedule_on_resume=config"):
        assert line in message, message
    assert "min_lr" not in message
    ours = resume("config")
    assert (ours.lr_decay_steps, ours.max_lr, ours.num_steps) == (40, 1e-3, 3)
    kept = resume("checkpoint")
    assert (kept.lr_decay_steps, kept.max_lr, kept.num_steps) == (20, 3e-3, 3)
