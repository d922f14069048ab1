"""Start-up checks of the training entry point that need no training."""
import logging

import pytest

from megatron_ratplus.training.cli import main, show_package_notes
from megatron_ratplus.training.config import ConfigError, load_config
from megatron_ratplus.training.run import _refuse_to_shadow_checkpoints


def test_fresh_run_into_a_save_dir_with_checkpoints_is_refused(tmp_path):
    (tmp_path / "iter_0000050").mkdir()
    cfg = load_config("recipes/tiny-cpu.yaml", [f"checkpoint.save_dir={tmp_path}", "checkpoint.load="])
    with pytest.raises(ConfigError, match="already holds checkpoints .*iter_0000050.*checkpoint.load=latest"):
        _refuse_to_shadow_checkpoints(cfg)
    # Resuming is fine, and so is an empty save_dir.
    _refuse_to_shadow_checkpoints(load_config("recipes/tiny-cpu.yaml", [f"checkpoint.save_dir={tmp_path}"]))
    _refuse_to_shadow_checkpoints(load_config("recipes/tiny-cpu.yaml", [f"checkpoint.save_dir={tmp_path / 'new'}",
                                                                        "checkpoint.load="]))
    assert (tmp_path / "iter_0000050").is_dir()


@pytest.mark.parametrize("argv,message", [
    (["recipes/tiny-cpu.yaml", "train.lrr=1"], "unknown key(s) train.lrr"),
    (["recipes/tiny-cpu.yaml", "nodot=1"], "must be section.key"),
    (["recipes/tiny-cpu.yaml", "train.lr=fast"], "train.lr must be a number"),
    (["recipes/missing.yaml"], "does not exist"),
    (["recipes/tiny-cpu.yaml", "checkpoint.lr_schedule_on_resume=sometimes"],
     "checkpoint.lr_schedule_on_resume must be one of strict, checkpoint, config"),
    (["recipes/tiny-cpu.yaml", "checkpoint.optimizer_format=fully_sharded_model_space"],
     "checkpoint.optimizer_format must be one of dp_reshardable, fully_reshardable"),
    (["recipes/ratplus-1.5b-100bt.yaml", "--dry-run", "--world-size", "63"], "not divisible"),

])
def test_cli_rejects_bad_input_with_exit_code_2(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--world-size", "0"], "expected an integer >= 1"),
    (["--gpu-memory-gib", "nan"], "a finite number > 0"),
    (["--tokens-per-sec-per-gpu", "inf"], "a finite number > 0"),
])
def test_bad_dry_run_options_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["recipes/ratplus-1.5b-100bt.yaml", "--dry-run", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_overrides_may_follow_the_options(capsys):
    """As the plan's own hints suggest: append ``parallel.tensor_parallel=2`` to the command."""
    assert main(["recipes/ratplus-1.5b-100bt.yaml", "--dry-run", "--world-size", "8",
                 "parallel.tensor_parallel=2", "train.precision=fp32"]) == 0
    out = capsys.readouterr().out
    assert "TP 2 × PP 1 × DP 4" in out and "UNRELIABLE for fp32 training" in out


def test_cli_dry_run_prints_the_plan(capsys):
    assert main(["recipes/ratplus-2.6b-200bt.yaml", "--dry-run", "--world-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "2,732,997,120" in out and "DP 128" in out


def test_impossible_layout_for_the_launched_world_is_a_config_error(monkeypatch, capsys):
    """Checked before any process group exists: under torchrun with 3 processes, TP=2 cannot fit."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["recipes/tiny-cpu.yaml", "parallel.tensor_parallel=2", "checkpoint.save_dir=",
                 "checkpoint.load="]) == 2
    assert "world size 3 is not divisible by tensor_parallel" in capsys.readouterr().err


def test_a_token_budget_resumed_at_another_batch_size_names_the_steps_that_meet_it():
    from megatron_ratplus.training.loop import TrainState
    from megatron_ratplus.training.run import _check_token_budget
    base = ["train.max_steps=", "train.max_tokens=16384", "train.seq_len=256", "checkpoint.save_dir="]
    same = load_config("recipes/tiny-cpu.yaml", base + ["train.global_batch_size=8"])      # 2,048 tokens a step
    _check_token_budget(same, TrainState(step=2, consumed_tokens=4096), same.total_steps())
    _check_token_budget(same, TrainState(), same.total_steps())
    bigger = load_config("recipes/tiny-cpu.yaml", base + ["train.global_batch_size=16"])   # 4,096 a step
    assert bigger.total_steps() == 4
    with pytest.raises(ConfigError, match=r"met after step 5, not after the 4 steps .*train.max_steps=5 "
                                          r"train.max_tokens="):
        _check_token_budget(bigger, TrainState(step=2, consumed_tokens=4096), bigger.total_steps())
    fixed = load_config("recipes/tiny-cpu.yaml", ["train.max_steps=5", "train.max_tokens=",
                                                  "train.global_batch_size=16"])
    _check_token_budget(fixed, TrainState(step=2, consumed_tokens=4096), fixed.total_steps())


def test_resuming_another_save_dirs_checkpoint_into_a_save_dir_with_checkpoints_is_refused(tmp_path):
    """checkpoint.load=<elsewhere>/iter_… with a save_dir that holds another run's checkpoints would
    mix the two runs there: its tracker would move to the loaded run's iterations and keep_last
    retention would delete the other run's checkpoints (iter_0000001 and 2 were gone after two saves)."""
    save_dir, other = tmp_path / "b", tmp_path / "a"
    (save_dir / "iter_0000001").mkdir(parents=True)
    (other / "iter_0000005").mkdir(parents=True)
    cfg = load_config("recipes/tiny-cpu.yaml", [f"checkpoint.save_dir={save_dir}",
                                                f"checkpoint.load={other / 'iter_0000005'}"])
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(iter_0000001\).*"
                                          r"checkpoint.load=.*iter_0000005.*another save_dir"):
        _refuse_to_shadow_checkpoints(cfg)
    cfg.checkpoint.load = str(other)                  # that save_dir's latest
    with pytest.raises(ConfigError, match="another save_dir"):
        _refuse_to_shadow_checkpoints(cfg)
    # A rollback inside the save_dir (newer complete checkpoints are refused elsewhere), and a
    # continuation into a new save_dir, are fine.
    for load, target in [(save_dir / "iter_0000001", save_dir), (save_dir, save_dir),
                         (other / "iter_0000005", tmp_path / "new")]:
        _refuse_to_shadow_checkpoints(load_config("recipes/tiny-cpu.yaml", [
            f"checkpoint.save_dir={target}", f"checkpoint.load={load}"]))
    assert (save_dir / "iter_0000001").is_dir()


def test_the_cli_shows_the_package_info_notes_but_not_megatrons(capsys):
    """Which checkpoint was loaded, an allowed pattern change, when a background save completes: the
    package logs these at INFO, which Python drops without a handler; Megatron-core's INFO stays hidden."""
    package = logging.getLogger("megatron_ratplus")
    saved = package.handlers[:], package.level, package.propagate
    try:
        package.handlers.clear()
        show_package_notes()
        show_package_notes()        # idempotent: one handler
        logging.getLogger("megatron_ratplus.checkpoint.manager").info("loaded checkpoint %s", "iter_0000004")
        logging.getLogger("megatron.core.dist_checkpointing").info("megatron chatter")
        err = capsys.readouterr().err
        assert err.count("loaded checkpoint iter_0000004") == 1 and "megatron chatter" not in err
    finally:
        package.handlers[:], package.level, package.propagate = saved
