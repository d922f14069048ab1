"""TP=1 state dict <-> checkpoint, for the Hugging Face converter."""
import pytest
import torch

from megatron_ratplus.checkpoint import CheckpointError, CheckpointManager, load_weights_only
from megatron_ratplus.checkpoint.hf_bridge import (build_tp1_model, load_full_state_dict, read_train_state,
                                                   save_full_state_dict)

from .helpers import build, run_config, train_step

ARGS = dict(num_layers=2, hidden_size=64, num_attention_heads=2, vocab_size=100, max_seq_len=16,
            dilation=4, local_window=1, initial_tokens=1)


def random_state_dict(args):
    gen = torch.Generator().manual_seed(3)
    model = build_tp1_model(args)
    return {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}


def test_save_then_load_is_identical(tmp_path, megatron_world):
    sd = random_state_dict(ARGS)
    ckpt = save_full_state_dict(ARGS, sd, tmp_path / "out", train_state={"source": "hf"})
    assert ckpt.name == "iter_0000000" and (tmp_path / "out" / "latest_checkpointed_iteration.txt").exists()
    args, loaded = load_full_state_dict(tmp_path / "out")
    assert args == ARGS
    assert loaded.keys() == sd.keys()
    assert "decoder.layers.1.self_attention.linear_in.weight" in loaded
    for k in sd:
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], sd[k]), k
    assert read_train_state(tmp_path / "out") == {"source": "hf", "step": 0, "consumed_tokens": 0,
                                                  "model_args": ARGS}
    # An iter_* path works as well as the save_dir.
    assert torch.equal(load_full_state_dict(ckpt)[1]["output_layer.weight"], sd["output_layer.weight"])


def test_unpadded_vocab_rows_are_padded_with_zeros(tmp_path, megatron_world):
    sd = random_state_dict(ARGS)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert sd[name].shape[0] == 128
        sd[name] = sd[name][:100].clone()
    save_full_state_dict(ARGS, sd, tmp_path / "out")
    _, loaded = load_full_state_dict(tmp_path / "out")
    emb = loaded["embedding.word_embeddings.weight"]
    assert torch.equal(emb[:100], sd["embedding.word_embeddings.weight"]) and not emb[100:].any()


def test_state_dict_errors_and_no_overwrite(tmp_path, megatron_world):
    sd = random_state_dict(ARGS)
    broken = dict(sd)
    broken.pop("decoder.layers.0.mlp.linear_fc1.weight")
    broken["decoder.layers.0.self_attention.linear_out.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        save_full_state_dict(ARGS, broken, tmp_path / "bad")
    assert "missing: decoder.layers.0.mlp.linear_fc1.weight" in str(err.value)
    assert "wrong shape decoder.layers.0.self_attention.linear_out.weight" in str(err.value)
    save_full_state_dict(ARGS, sd, tmp_path / "out")
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        save_full_state_dict(ARGS, sd, tmp_path / "out")


def test_import_into_a_run_save_dir_is_refused_and_leaves_its_latest(tmp_path, megatron_world):
    """An imported model is iteration 0: beside a run's checkpoints it would become ``latest``."""
    from megatron_ratplus.checkpoint.paths import LOCK_NAME, read_tracker
    sd = random_state_dict(ARGS)
    run_dir = tmp_path / "run"
    CheckpointManager(run_dir).save(500, [build_tp1_model(ARGS)], None, None, {"step": 500, "model_args": ARGS})
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(iter_0000500"):
        save_full_state_dict(ARGS, sd, run_dir)
    assert read_tracker(run_dir) == (500, None)
    assert sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME) == \
        ["iter_0000500", "latest_checkpointed_iteration.txt"]


def test_training_checkpoint_exports_fp32_master_weights(tmp_path, megatron_world):
    """bf16 training: the export holds the optimizer's fp32 master weights, not bf16 roundings."""
    cfg = run_config(precision="bf16")
    objs = build(cfg)
    for step in range(3):
        train_step(objs, step)
    CheckpointManager(tmp_path / "ckpt").save(3, objs.model, objs.optimizer, objs.scheduler,
                                              {"step": 3, "model_args": objs.model_args.to_dict()})
    args, sd = load_full_state_dict(tmp_path / "ckpt")
    assert args == objs.model_args.to_dict()
    chained = objs.optimizer.chained_optimizers
    masters = {id(model_p): master for opt in chained
               for model_group, master_group in zip(opt.float16_groups, opt.fp32_from_float16_groups)
               for model_p, master in zip(model_group, master_group)}
    model = objs.model[0].module.module
    exact = 0
    for name, p in model.named_parameters():
        want = masters[id(p)]
        assert torch.equal(sd[name], want), name
        exact += not torch.equal(want, p.detach().float())
    assert exact > 0   # the masters really differ from the bf16 weights


def test_weights_only_checkpoint_starts_a_run_but_cannot_resume_one(tmp_path, megatron_world):
    cfg = run_config(precision="bf16")
    objs = build(cfg)
    model = objs.model[0].module.module
    sd = {k: v.float() + 0.5 for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    save_full_state_dict(objs.model_args.to_dict(), sd, tmp_path / "init")
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        CheckpointManager(tmp_path / "init").load("latest", objs.model, objs.optimizer, objs.scheduler)
    state = load_weights_only(tmp_path / "init", objs.model, optimizer=objs.optimizer)
    assert state["step"] == 0
    for k, v in model.state_dict().items():
        if not k.endswith("_extra_state"):
            assert torch.equal(v, sd[k].to(v.dtype)), k
    # The fresh optimizer's fp32 masters follow the loaded weights: a step starts from them.
    for opt in objs.optimizer.chained_optimizers:
        for model_group, master_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            for p, master in zip(model_group, master_group):
                assert torch.equal(master, p.detach().float())
