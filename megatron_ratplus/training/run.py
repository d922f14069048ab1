"""Wire a resolved :class:`RunConfig` into a running job: distributed set-up, data, model,
checkpoint resume or weight initialisation, the loop, shutdown."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from .. import atomic_files
from ..collectives import broadcast_object
from ..cpu_mode import cpu_mode_enabled
from ..model.config import pad_vocab_size
from ..parallel import ParallelLayout, destroy_distributed, initialize_distributed
from . import cuda_graph, fused_optimizer_update, fused_wgrad
from .config import ConfigError, RunConfig
from .data import TrainingData, dataset_manifest, resolve_streams
from .loop import TrainState, Trainer
from .setup import build_training_objects


def _rank0_print(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def _layout(cfg: RunConfig) -> ParallelLayout:
    p = cfg.parallel
    return ParallelLayout(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline_parallel, p.sequence_parallel)


def _loads_from_another_save_dir(cfg: RunConfig) -> bool:
    """``checkpoint.load`` names a checkpoint (or save_dir) outside ``checkpoint.save_dir``."""
    ck = cfg.checkpoint
    if not ck.load or ck.load == "latest":
        return False
    load, save_dir = os.path.realpath(ck.load), os.path.realpath(ck.save_dir)
    return save_dir not in (load, os.path.dirname(load))


def _refuse_to_shadow_checkpoints(cfg: RunConfig) -> None:
    """A fresh run into a save_dir that already holds checkpoints would stop at its first save
    (existing checkpoints are never overwritten), and a run continuing another save_dir's checkpoint
    would mix two runs there (its tracker, and keep_last retention deleting the other run's
    checkpoints): say so before any time is spent."""
    ck = cfg.checkpoint
    if not ck.save_dir or not Path(ck.save_dir).is_dir():
        return
    existing = sorted(p.name for p in Path(ck.save_dir).glob("iter_*"))
    if not existing:
        return
    if not ck.load:
        raise ConfigError(f"checkpoint.save_dir={ck.save_dir} already holds checkpoints ({', '.join(existing[-3:])}); "
                          f"resume with checkpoint.load=latest, or choose another checkpoint.save_dir")
    if _loads_from_another_save_dir(cfg):
        raise ConfigError(f"checkpoint.save_dir={ck.save_dir} already holds checkpoints ({', '.join(existing[-3:])}), "
                          f"and checkpoint.load={ck.load} is in another save_dir: continuing it here would mix two "
                          f"runs in one save_dir (keep_last retention would delete the other run's checkpoints). "
                          f"Choose an empty checkpoint.save_dir, or move those checkpoints away")


def _refuse_newer_checkpoints(cfg: RunConfig, step: int) -> None:
    """A run continuing from ``step`` (a rollback to an older checkpoint) into a save_dir that holds
    complete checkpoints of later iterations would be refused when it reaches them: say so now."""
    if not cfg.checkpoint.save_dir:
        return
    from ..checkpoint import complete_checkpoints_after
    newer = complete_checkpoints_after(cfg.checkpoint.save_dir, step)
    if newer:
        names = ", ".join(p.name for p in newer[:3]) + (f" and {len(newer) - 3} more" if len(newer) > 3 else "")
        raise ConfigError(f"checkpoint.save_dir={cfg.checkpoint.save_dir} holds complete checkpoints newer "
                          f"than step {step} the run continues from ({names}); the run would stop at the "
                          f"first of them (checkpoints are never overwritten). Move them out of the "
                          f"save_dir, or choose another checkpoint.save_dir")


# In save_dir: which config wrote the run's logs (see _refuse_to_mix_logs).
LOG_OWNER_NAME = ".ratplus-logs.json"


def _log_owner(cfg: RunConfig) -> dict:
    lg = cfg.logging
    config = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    return {"config_sha256": hashlib.sha256(config.encode()).hexdigest(),
            "tensorboard_dir": os.path.abspath(lg.tensorboard_dir) if lg.tensorboard_dir else None,
            "metrics_jsonl": os.path.abspath(lg.metrics_jsonl) if lg.metrics_jsonl else None}


def _an_earlier_attempt_of_this_run(cfg: RunConfig) -> bool:
    """The save_dir records that this very config last wrote these logs: they are an attempt of this
    run that ended before its first checkpoint (a requeue after a node failure or an OOM)."""
    if not cfg.checkpoint.save_dir:
        return False
    try:
        recorded = json.loads((Path(cfg.checkpoint.save_dir) / LOG_OWNER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return recorded == _log_owner(cfg)


def _refuse_to_mix_logs(cfg: RunConfig, step: int) -> bool:
    """A run starting from scratch would add its curves to the TensorBoard events or metrics file of
    an earlier run (a resumed one continues them; the logger drops points after its step). Rank 0
    looks, as it is the one that writes them; every rank raises.

    Returns True when the logs are those of an earlier attempt of this same run that saved no
    checkpoint (:func:`_an_earlier_attempt_of_this_run`): the run then restarts them as a resume at
    step 0 would (its points replace the attempt's), so that a requeued job starts by itself."""
    problem, restart = None, False
    lg = cfg.logging
    if dist.get_rank() == 0 and step == 0:
        if lg.tensorboard_dir and any(Path(lg.tensorboard_dir).glob("events.out.tfevents*")):
            problem = (f"logging.tensorboard_dir={lg.tensorboard_dir} already holds the events of another run; "
                       f"this run starts from scratch and its curves would mix with them: choose another "
                       f"directory (or move it away)")
        elif lg.metrics_jsonl and Path(lg.metrics_jsonl).is_file() and Path(lg.metrics_jsonl).stat().st_size:
            problem = (f"logging.metrics_jsonl={lg.metrics_jsonl} already holds the records of another run; "
                       f"this run starts from scratch: choose another file (or move it away)")
        if problem and _an_earlier_attempt_of_this_run(cfg):
            print(f"the logs are those of an earlier attempt of this run that saved no checkpoint "
                  f"({LOG_OWNER_NAME} in {cfg.checkpoint.save_dir}); its points are replaced", flush=True)
            problem, restart = None, True
    problem, restart = broadcast_object((problem, restart))
    if problem:
        raise ConfigError(problem)
    return restart


def _record_log_owner(cfg: RunConfig) -> None:
    """Rank 0 notes in save_dir which config writes the logs (read by the next start, above)."""
    if dist.get_rank() != 0 or not cfg.checkpoint.save_dir:
        return
    if not (cfg.logging.tensorboard_dir or cfg.logging.metrics_jsonl):
        return
    path = Path(cfg.checkpoint.save_dir) / LOG_OWNER_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_files.replace_text(path, json.dumps(_log_owner(cfg), indent=1))


def _check_token_budget(cfg: RunConfig, state: TrainState, total_steps: int) -> None:
    """``train.max_tokens`` becomes a step count at the configured tokens per step. A run resumed
    with another global batch size or sequence length would stop off its token budget: refuse,
    naming the step count that meets it."""
    t = cfg.train
    if t.max_tokens is None or state.step == 0:
        return
    per_step = t.global_batch_size * t.seq_len
    needed = state.step + max(0, -(-(int(t.max_tokens) - state.consumed_tokens) // per_step))
    if t.max_steps is not None:
        needed = min(needed, int(t.max_steps))
    if needed != total_steps:
        raise ConfigError(
            f"the run resumes at step {state.step} with {state.consumed_tokens:,} tokens consumed; at "
            f"{per_step:,} tokens per step train.max_tokens={int(t.max_tokens):,} is met after step {needed}, "
            f"not after the {total_steps} steps the config implies (the batch size or sequence length "
            f"changed): continue with train.max_steps={needed} train.max_tokens= (and "
            f"checkpoint.lr_schedule_on_resume=config or checkpoint for the schedule)")


def _restore(cfg: RunConfig, objs, data, state: TrainState):
    """Resume (``checkpoint.load``) or initialise weights (``checkpoint.init_from``)."""
    ck = cfg.checkpoint
    if ck.load:
        from ..checkpoint import CheckpointManager
        if ck.load == "latest" and not ck.save_dir:
            raise ConfigError("checkpoint.load=latest needs checkpoint.save_dir")
        source = ck.save_dir if ck.load == "latest" else ck.load
        manager = CheckpointManager(ck.save_dir or os.path.dirname(os.path.abspath(ck.load)))
        loaded = manager.load(ck.load, objs.model, objs.optimizer, objs.scheduler, model_args=objs.model_args)
        if loaded is None:
            if not ck.init_from:
                _rank0_print(f"no checkpoint under {source}: starting from scratch")
                return
        else:
            state.step = int(loaded["step"])
            state.consumed_tokens = int(loaded["consumed_tokens"])
            state.optimizer_updates = int(loaded.get("optimizer_updates", 0))
            state.skipped_updates = int(loaded.get("skipped_updates", 0))
            # a run halting after train.max_nonfinite_steps in a row counts across a resume
            state.consecutive_nonfinite = int(loaded.get("consecutive_nonfinite", 0))
            data.load_state_dict(loaded.get("data_state"))
            _rank0_print(f"resumed from step {state.step} ({state.consumed_tokens:,} tokens)")
            return
    if ck.init_from:
        from ..checkpoint import load_weights_only
        # The optimizer is passed so its fp32 master weights (bf16 training) take the loaded values.
        info = load_weights_only(ck.init_from, objs.model, optimizer=objs.optimizer, model_args=objs.model_args)
        _rank0_print(f"initialised weights from {ck.init_from} (pretrained for "
                     f"{(info or {}).get('step', '?')} steps); fresh optimizer and schedule")


def run_training(cfg: RunConfig) -> TrainState:
    cfg.check_output_paths()
    _refuse_to_shadow_checkpoints(cfg)
    # Validate the layout against torchrun's world size before any process group exists, so an
    # impossible layout is a ConfigError (exit 2 with a message), not a traceback from Megatron's set-up.
    dp, accum = cfg.layout_for(int(os.environ.get("WORLD_SIZE", "1")))
    info = initialize_distributed(_layout(cfg), seed=cfg.train.seed)
    try:
        # A preemption signal sent to the whole job (Slurm's --signal=USR1) must kill neither
        # multiprocessing's resource tracker (started before the data pipeline registers streaming's
        # shared memory with it) nor torch.compile's worker pool (see the functions).
        from ..checkpoint.preemption import start_compile_workers_shielded, start_resource_tracker_shielded
        start_resource_tracker_shielded()
        if not cpu_mode_enabled():      # (CPU mode runs the PyTorch references, nothing compiled)
            start_compile_workers_shielded()
        if cfg.checkpoint.save_dir:
            from ..checkpoint import CheckpointManager
            # One run per save_dir: a second one is refused here, before any work (held until exit).
            CheckpointManager(cfg.checkpoint.save_dir).claim_save_dir()
        world = info["world_size"]
        t = cfg.train
        streams = resolve_streams(cfg, seq_len=t.seq_len)
        manifest = dataset_manifest(streams)
        args = cfg.model.model_args(vocab_size=manifest.vocab_size if manifest else None, seq_len=t.seq_len)
        if manifest is not None:
            from ..data import check_manifest_compat
            try:
                check_manifest_compat(manifest, vocab_size=args.vocab_size, seq_len=t.seq_len)
            except ValueError as e:
                raise ConfigError(str(e)) from e
        total_steps = cfg.total_steps()
        _rank0_print("resolved config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        _rank0_print(f"model: {cfg.model.preset} with {args.num_parameters(pad_vocab_size(args.vocab_size)):,} "
                     f"parameters | layout TP={cfg.parallel.tensor_parallel} PP={cfg.parallel.pipeline_parallel} "
                     f"DP={dp} (world {world}{', CPU mode' if info['cpu_mode'] else ''}) | "
                     f"{accum} micro-batches of {t.micro_batch_size} per step | {total_steps} steps | "
                     f"{'joint sparse+dense' if t.joint else t.mode} training")
        objs = build_training_objects(cfg, args, total_steps)
        _rank0_print(f"weight-gradient accumulation: {fused_wgrad.describe(objs.transformer_config.gradient_accumulation_fusion)}")
        _rank0_print(f"CUDA graphs: {cuda_graph.describe(objs.step_graphs)}")
        _rank0_print(f"optimizer update: {fused_optimizer_update.describe(objs.optimizer)}")
        evaluates = bool(cfg.logging.eval_interval) and cfg.logging.eval_interval <= total_steps
        device = torch.device("cpu") if cpu_mode_enabled() else torch.device("cuda", torch.cuda.current_device())
        data = TrainingData(streams, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size, seed=t.seed,
                            device=device, val_streams=cfg.data.val_streams or None,
                            cache_dir=cfg.data.cache_dir, num_workers=cfg.data.num_workers,
                            readers_per_node=cfg.data.readers_per_node, vocab_size=args.vocab_size,
                            eval_micro_batches=cfg.logging.eval_iters * accum if evaluates else 0,
                            global_batch_size=t.global_batch_size, verify_shards=cfg.data.verify_shards)
        state = TrainState()
        _restore(cfg, objs, data, state)
        _refuse_newer_checkpoints(cfg, state.step)
        _check_token_budget(cfg, state, total_steps)
        logs_restart = _refuse_to_mix_logs(cfg, state.step)
        _record_log_owner(cfg)
        checkpoints = preemption = None
        if cfg.checkpoint.save_dir:
            from ..checkpoint import CheckpointManager, PreemptionHandler
            checkpoints = CheckpointManager(cfg.checkpoint.save_dir, keep_last=cfg.checkpoint.keep_last,
                                            async_save=cfg.checkpoint.async_save,
                                            optimizer_format=cfg.checkpoint.optimizer_format)
            preemption = PreemptionHandler()
            preemption.install()
        trainer = Trainer(cfg, objs, data, world_size=world, rank=info["rank"], total_steps=total_steps,
                          accum_steps=accum, checkpoints=checkpoints, preemption=preemption, state=state,
                          replace_logged_attempt=logs_restart)
        final = trainer.run()
        _rank0_print(f"done: {final.step} steps, {final.consumed_tokens:,} tokens, "
                     f"{final.optimizer_updates} optimizer updates, {final.skipped_updates} skipped")
        return final
    finally:
        destroy_distributed()
