"""Run outputs of the metrics logger: a resumed run continues its curves without duplicates, a fresh
run does not write into another run's."""
import json

import pytest

from megatron_ratplus.training.config import ConfigError, load_config
from megatron_ratplus.training.metrics import MetricsLogger, StepRecord
from megatron_ratplus.training.run import _record_log_owner, _refuse_to_mix_logs


def log_steps(tmp_path, steps, start_step, replace_logged_attempt=False):
    logger = MetricsLogger(rank=0, world_size=1, total_steps=10, start_step=start_step, tokens_per_step=8,
                           flops_per_step=1.0, tensorboard_dir=str(tmp_path / "tb"), progress=False,
                           metrics_jsonl=str(tmp_path / "m.jsonl"), replace_logged_attempt=replace_logged_attempt)
    for step in steps:
        logger.log_step(StepRecord(step, {"dense": float(step)}, lr=start_step / 10, grad_norm=1.0,
                                   step_time=1.0, tokens=8))
    logger.log_eval(steps[-1], {"dense": 0.5})
    logger.close()


def test_a_resumed_run_replaces_the_points_after_its_step(tmp_path):
    """A run killed after step 5, resumed from its step-3 checkpoint, writes steps 4-6 again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log_steps(tmp_path, [1, 2, 3, 4, 5], start_step=0)
    (tmp_path / "m.jsonl").write_text((tmp_path / "m.jsonl").read_text() + "not json\n")
    log_steps(tmp_path, [4, 5, 6], start_step=3)
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line != "not json"]
    assert [r["step"] for r in records if "losses" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in records if "losses" in r][3:] == [0.3] * 3       # the resumed run's
    assert "not json" in lines
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/dense")] == [1, 2, 3, 4, 5, 6]
    assert [round(e.value, 3) for e in events.Scalars("lr")][3:] == [0.3] * 3


def test_a_fresh_run_refuses_another_runs_logs(tmp_path, megatron_single_process):
    log_steps(tmp_path, [1, 2], start_step=0)
    tb = load_config("recipes/tiny-cpu.yaml", [f"logging.tensorboard_dir={tmp_path / 'tb'}",
                                               "logging.metrics_jsonl="])
    jsonl = load_config("recipes/tiny-cpu.yaml", ["logging.tensorboard_dir=",
                                                  f"logging.metrics_jsonl={tmp_path / 'm.jsonl'}"])
    for cfg, key in ((tb, "logging.tensorboard_dir"), (jsonl, "logging.metrics_jsonl")):
        with pytest.raises(ConfigError, match=f"{key}=.* another run"):
            _refuse_to_mix_logs(cfg, 0)
        _refuse_to_mix_logs(cfg, 2)                        # a resumed run continues them
    empty = load_config("recipes/tiny-cpu.yaml", [f"logging.tensorboard_dir={tmp_path / 'new'}",
                                                  f"logging.metrics_jsonl={tmp_path / 'new.jsonl'}"])
    _refuse_to_mix_logs(empty, 0)


def test_a_requeued_attempt_of_the_same_run_restarts_its_logs(tmp_path, megatron_single_process):
    """An attempt that died before its first checkpoint (node failure, OOM) is requeued by Slurm with
    the same config: it starts by itself, and its points replace the attempt's. Another config, or
    logs whose writer the save_dir does not record, are still refused."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    overrides = [f"logging.tensorboard_dir={tmp_path / 'tb'}", f"logging.metrics_jsonl={tmp_path / 'm.jsonl'}",
                 f"checkpoint.save_dir={tmp_path / 'ckpt'}", "checkpoint.load=latest"]
    cfg = load_config("recipes/tiny-cpu.yaml", overrides)
    assert _refuse_to_mix_logs(cfg, 0) is False
    _record_log_owner(cfg)
    log_steps(tmp_path, [1, 2, 3, 4, 5], start_step=0)                 # the attempt, killed after step 5

    other = load_config("recipes/tiny-cpu.yaml", overrides + ["train.lr=1e-4"])
    with pytest.raises(ConfigError, match="logging.tensorboard_dir=.* another run"):
        _refuse_to_mix_logs(other, 0)
    unrecorded = load_config("recipes/tiny-cpu.yaml", overrides[:2] + [f"checkpoint.save_dir={tmp_path / 'new'}"])
    with pytest.raises(ConfigError, match="another run"):
        _refuse_to_mix_logs(unrecorded, 0)

    assert _refuse_to_mix_logs(cfg, 0) is True                          # the requeue
    log_steps(tmp_path, [1, 2, 3], start_step=0, replace_logged_attempt=True)
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "losses" in r] == [1, 2, 3]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/dense")] == [1, 2, 3]


def test_a_record_cut_off_mid_write_is_dropped_on_resume(tmp_path):
    from megatron_ratplus.training.metrics import drop_records_after
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"note": "kept"}\n{"step": 2}\n{"step": 3, "los')
    drop_records_after(path, 2)
    assert path.read_text() == '{"step": 1}\n{"note": "kept"}\n{"step": 2}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


def test_validation_losses_reach_weights_and_biases(tmp_path, monkeypatch):
    """With logging.wandb_project set, W&B receives the validation losses of an evaluation, as
    TensorBoard and the metrics file do, at the step they were measured."""
    import sys
    import types

    logged = []
    run = types.SimpleNamespace(log=lambda data, step=None: logged.append((step, data)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
    logger = MetricsLogger(rank=0, world_size=1, total_steps=10, start_step=0, tokens_per_step=8,
                           flops_per_step=1.0, progress=False, wandb_project="p")
    logger.log_step(StepRecord(5, {"sparse": 2.0, "dense": 1.5}, lr=0.1, grad_norm=1.0, step_time=1.0, tokens=8))
    logger.log_eval(5, {"sparse": 2.5, "dense": 2.25})
    logger.close()
    assert (5, {"val_loss/sparse": 2.5, "val_loss/dense": 2.25}) in logged, logged
