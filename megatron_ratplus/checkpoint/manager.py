"""Save and resume training state with Megatron-core ``dist_checkpointing`` (torch_dist format).

    mgr = CheckpointManager(save_dir, keep_last=3, async_save=True)
    state = mgr.load("latest", model_chunks, optimizer, scheduler)   # None: fresh start
    ...
    mgr.save(step, model_chunks, optimizer, scheduler, train_state)  # collective
    mgr.finalize()                                                   # before exit

Every method that touches checkpoint contents is collective (all ranks call it). Decisions that
depend on the file system (does the directory exist, which checkpoint is the latest complete
one) are taken on rank 0 and broadcast, so all ranks raise or proceed together.

On-disk layout: ``<save_dir>/iter_XXXXXXX/`` per checkpoint (never overwritten) and
``<save_dir>/latest_checkpointed_iteration.txt``, replaced atomically only after the checkpoint is
complete on every rank and passed :func:`~.validate.checkpoint_problems`.

One run at a time per save_dir: rank 0 holds the run lock ``<save_dir>/.ratplus-run.lock``
(:meth:`CheckpointManager.claim_save_dir`, taken at the latest by the first save or a resume from
``latest``) until :meth:`CheckpointManager.close` or the end of the process.

``train_state`` is the caller's picklable dict (step, consumed tokens, data-loader state, run
config, model args…). Rank 0's copy is stored; per-rank RNG states are added by the manager
itself and restored when the parallel layout is unchanged.
"""
from __future__ import annotations

import datetime
import logging
import os
from functools import partial
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from .. import collectives
from ..process_lifetime import die_with_parent
from .architecture import architecture_of, compare_architectures, unwrap_model
from .errors import CheckpointError
from .paths import (LOCK_NAME, TRACKER_NAME, format_size, is_save_dir, iter_dir_name, iteration_of,
                    leftovers, list_iter_dirs, lock_save_dir, looks_like_checkpoint, read_tracker,
                    unlock_save_dir, write_tracker)
from .preemption import spawning_shielded_helpers
from .retention import apply_retention
from .rng import restore_rng_state
from .state import (DISTRIBUTED_OPTIMIZER_FORMATS, FORMAT_VERSION, RNG_KEY, adam_steps_set_aside,
                    load_strategy, model_sharded_state_dict, model_state_key, optimizer_has_stepped,
                    optimizer_kind, parallel_layout, prepare_for_loading, restore_adam_steps,
                    rng_sharded_object, runtime_metadata, save_strategy, sharded_metadata, versions)
from .validate import (RATPLUS_KEY, TRAIN_STATE_KEY, checkpoint_problems, decode_train_state,
                       encode_train_state, load_common)

log = logging.getLogger(__name__)


def _info(msg, *args):
    if collectives.rank() == 0:
        log.info(msg, *args)


def _warn(msg, *args):
    if collectives.rank() == 0:
        log.warning(msg, *args)


def _raise_together(error: Optional[str]) -> None:
    """Raise ``CheckpointError(error)`` on every rank when rank 0 decided ``error``."""
    error = collectives.broadcast_object(error)
    if error:
        raise CheckpointError(error)


def _require_psutil() -> None:
    # Megatron-core's torch_dist writer calls psutil inside its forked writer processes; without it
    # the writers die and the save hangs instead of failing.
    try:
        import psutil  # noqa: F401
    except ImportError as e:
        raise CheckpointError("saving torch_dist checkpoints needs the 'psutil' package "
                              "(megatron-core's checkpoint writer uses it): pip install psutil") from e


def _model_args_dict(model_args) -> Optional[dict]:
    if model_args is None:
        return None
    return model_args.to_dict() if hasattr(model_args, "to_dict") else dict(model_args)


def start_writer_helpers() -> None:
    """Start the helper process of Megatron's torch_dist writer now, shielded from preemption signals.

    The writer keeps its results queue in a ``multiprocessing`` Manager process, spawned at the
    first save and reused by every later one. Started unshielded, it dies of the SIGTERM that
    Slurm or Ctrl-C send to every process of the job, and the very save the preemption handler
    asked for fails (BrokenPipeError). Shielded, no signal but SIGKILL ends it, so it also dies
    with the trainer (:func:`~megatron_ratplus.process_lifetime.die_with_parent`): a trainer killed
    outright (the OOM killer, torchrun's restart of a failed group) runs no clean-up, and its
    Manager (with torch imported, most of a GB) would otherwise live on, reparented to init, one
    per rank and restart. Megatron starts the same Manager as ``ctx.Manager().Queue()``; this
    fills its ``_results_queue`` the same way, with the initializer added. Call from the main
    thread (the kernel's parent-death signal follows the thread that spawned the child).
    Idempotent; a no-op when someone else already started it.
    """
    from multiprocessing import get_context
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    if getattr(filesystem_async, "_results_queue", True) is not None:
        return
    manager = SyncManager(ctx=get_context("spawn"))
    with spawning_shielded_helpers():
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()   # the proxy keeps the manager alive


_reported_leftovers = {}


def _report_leftovers(save_dir: Path) -> None:
    """Warn about what killed processes left in ``save_dir`` (once per process for the same
    leftovers: a run builds one manager to resume and another to save)."""
    found = leftovers(save_dir)
    names = sorted(path.name for path, _, _ in found)
    if _reported_leftovers.get(os.path.realpath(save_dir)) == names:
        return
    _reported_leftovers[os.path.realpath(save_dir)] = names
    if found:
        log.warning("%s holds leftovers of interrupted saves or deletions (not removed automatically):\n  %s",
                    save_dir, "\n  ".join(f"{path} ({format_size(size)}): {what}"
                                           for path, size, what in found))


# --------------------------------------------------------------------------------------------
# Which checkpoint to load
# --------------------------------------------------------------------------------------------
def _latest_complete(save_dir: Path, *, explicit: bool) -> Optional[Path]:
    """Newest complete checkpoint the tracker allows (rank-0 logic; raises CheckpointError)."""
    tracked, tracker_problem = read_tracker(save_dir)
    entries = list_iter_dirs(save_dir)
    had_tracker = tracked is not None or tracker_problem is not None
    if not had_tracker and not entries:
        if explicit:
            raise CheckpointError(f"{save_dir} holds no checkpoint (no iter_* directory, no {TRACKER_NAME})")
        return None
    if tracker_problem:
        log.warning("%s; looking for the newest complete checkpoint instead", tracker_problem)
        candidates = entries
    elif tracked is None:
        log.warning("%s has checkpoint directories but no %s (no save completed, or the file was "
                    "removed); looking for the newest complete one", save_dir, TRACKER_NAME)
        candidates = entries
    else:
        newer = [(it, p) for it, p in entries if it > tracked]
        ahead = _same_run_ahead_of_tracker(save_dir, tracked, newer)
        if ahead is not None:
            log.warning("%s names iteration %d, but %s is complete and was written by the same run: its "
                        "save was interrupted after the checkpoint was complete, before the tracker moved; "
                        "resuming from %s", TRACKER_NAME, tracked, ahead.name, ahead)
            return ahead
        if newer:
            log.warning("ignoring %s: newer than the latest completed save (iteration %d) recorded "
                        "in %s", ", ".join(p.name for _, p in newer), tracked, TRACKER_NAME)
        if tracked not in [it for it, _ in entries]:
            log.warning("%s names iteration %d but %s does not exist", TRACKER_NAME, tracked,
                        save_dir / iter_dir_name(tracked))
        candidates = [(it, p) for it, p in entries if it <= tracked]
    rejected = []
    for it, path in reversed(candidates):
        problems = checkpoint_problems(path)
        if not problems:
            if rejected:
                log.warning("resuming from the previous complete checkpoint %s instead", path)
            return path
        rejected.append(f"{path.name}: {'; '.join(problems)}")
        log.warning("checkpoint %s is incomplete or corrupt (%s); falling back to the previous one",
                    path, "; ".join(problems))
    if had_tracker or explicit:
        detail = ("\n  " + "\n  ".join(rejected)) if rejected else " (no iter_* directory)"
        raise CheckpointError(f"no complete checkpoint in {save_dir}" +
                              (f" (the tracker names iteration {tracked})" if tracked is not None else "") +
                              f":{detail}")
    log.warning("no complete checkpoint in %s (earlier saves never finished): starting from scratch",
                save_dir)
    return None


def _run_record(path: Path) -> Optional[dict]:
    """Who wrote checkpoint ``path`` and how far it had got, from its common.pt (None when the
    train state does not record the run config)."""
    try:
        common = load_common(path)
        train_state = decode_train_state(common)
    except Exception:
        return None
    run_config = train_state.get("run_config")
    if not isinstance(run_config, dict):
        return None
    return {"save_dir": (run_config.get("checkpoint") or {}).get("save_dir"),
            "seed": (run_config.get("train") or {}).get("seed"),
            "model_args": _model_args_dict(train_state.get("model_args")),
            "architecture": (common.get(RATPLUS_KEY) or {}).get("architecture"),
            "step": train_state.get("step"), "consumed_tokens": train_state.get("consumed_tokens")}


def _continues(earlier: Optional[dict], later: Optional[dict], iteration: int, save_dir: Path) -> bool:
    """Whether ``later`` (checkpoint ``iteration``) is the run of ``earlier`` further on: written
    into this save_dir (as recorded then, or as it is now) with the same seed and model, and
    further in steps and tokens."""
    if earlier is None or later is None or later["save_dir"] is None:
        return False
    same_dir = (later["save_dir"] == earlier["save_dir"]
                or os.path.realpath(later["save_dir"]) == os.path.realpath(save_dir))
    further = (later["step"] == iteration and earlier["step"] is not None and later["step"] > earlier["step"]
               and (earlier["consumed_tokens"] is None or later["consumed_tokens"] is None
                    or later["consumed_tokens"] > earlier["consumed_tokens"]))
    same_run = all(later[k] == earlier[k] for k in ("seed", "model_args", "architecture"))
    return same_dir and same_run and further


def _same_run_ahead_of_tracker(save_dir: Path, tracked: int, newer) -> Optional[Path]:
    """The newest complete checkpoint after the tracked one that the same run wrote, if any.

    A process killed between a checkpoint becoming complete and the tracker moving (the manager's
    completion step: barrier, verification, tracker write) leaves exactly that. Resuming from the
    tracked one instead would be refused as soon as the run reached the newer iteration. A newer
    checkpoint of another run (other seed, model or save_dir, or no run config recorded) is not
    followed.
    """
    tracked_dir = save_dir / iter_dir_name(tracked)
    if not newer or not tracked_dir.is_dir() or checkpoint_problems(tracked_dir):
        return None
    earlier = _run_record(tracked_dir)
    for it, path in reversed(newer):
        if not checkpoint_problems(path) and _continues(earlier, _run_record(path), it, save_dir):
            return path
    return None


def complete_checkpoints_after(save_dir, step: int) -> List[Path]:
    """Complete checkpoints in ``save_dir`` of an iteration above ``step``, oldest first.

    A run that continues from ``step`` in that save_dir (a rollback to an earlier checkpoint, or
    a save_dir that already holds another run) would reach their iterations and be refused at
    that save, since checkpoints are never overwritten; callers refuse to start instead.
    """
    return [path for it, path in list_iter_dirs(save_dir) if it > step and not checkpoint_problems(path)]


def resolve_checkpoint(which, save_dir=None) -> Optional[Path]:
    """The checkpoint directory ``which`` designates ("latest", an iter_* dir, or a save_dir).

    Rank 0 decides, every rank gets the answer (or the same CheckpointError).
    """
    result, error = None, None
    if collectives.rank() == 0:
        try:
            result = resolve_checkpoint_local(which, save_dir)
        except CheckpointError as e:
            error = str(e)
    _raise_together(error)
    result = collectives.broadcast_object(str(result) if result is not None else None)
    return Path(result) if result is not None else None


def resolve_checkpoint_local(which, save_dir) -> Optional[Path]:
    if which is None or which == "latest":
        if save_dir is None:
            raise CheckpointError("loading 'latest' needs a save_dir (checkpoint.save_dir)")
        return _latest_complete(Path(save_dir), explicit=False)
    path = Path(which)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if looks_like_checkpoint(path):
        problems = checkpoint_problems(path)
        if problems:
            raise CheckpointError(f"checkpoint {path} is incomplete or corrupt:\n  " + "\n  ".join(problems))
        return path
    if is_save_dir(path):
        return _latest_complete(path, explicit=True)
    raise CheckpointError(f"{path} is neither a checkpoint directory (iter_XXXXXXX with metadata.json) "
                          f"nor a save_dir holding checkpoints")


# --------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------
def _check_architecture(ckpt_dir: Path, info: dict, model_chunks, model_args) -> None:
    stored = dict(info.get("architecture") or {})
    stored_args = info.get("model_args")
    if stored_args and stored_args.get("vocab_size") is not None:
        stored.setdefault("vocab_size", stored_args["vocab_size"])
    current = architecture_of(model_chunks, model_args)
    errors, notes = compare_architectures(stored, current)
    if errors:
        raise CheckpointError(f"checkpoint {ckpt_dir} does not match the model being loaded "
                              f"({len(errors)} difference{'s' if len(errors) > 1 else ''}):\n  " +
                              "\n  ".join(errors))
    if notes:
        _info("loading %s into a model with a different attention configuration (allowed): %s",
              ckpt_dir, "; ".join(notes))


# The distributed optimizer's dp_reshardable checkpoint format (state.py) follows its buffers,
# which these decide.
MODEL_PARALLEL_FIELDS = ("tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel")

_SCHEDULE_FIELDS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                    "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")


def _check_schedule(ckpt_dir: Path, scheduler, stored: Optional[dict]) -> None:
    """A scheduler that neither keeps the checkpoint's schedule nor overrides it must match it:
    list every difference here, before anything is read, instead of Megatron's assertion on the
    first one."""
    if stored is None or scheduler.use_checkpoint_opt_param_scheduler or scheduler.override_opt_param_scheduler:
        return
    current = scheduler.state_dict()
    differences = [f"{name}: checkpoint {stored[name]!r}, this run {current[name]!r}"
                   for name in _SCHEDULE_FIELDS if name in stored and stored[name] != current[name]]
    if differences:
        raise CheckpointError(
            f"the LR schedule of this run differs from the one of checkpoint {ckpt_dir}:\n  "
            + "\n  ".join(differences)
            + f"\nset checkpoint.lr_schedule_on_resume=config to continue on this run's schedule from "
              f"step {stored.get('num_steps', '?')}, =checkpoint to keep the checkpoint's, or restore the "
              f"original settings")


def load_checkpoint_into(ckpt_dir, model_chunks: Sequence[torch.nn.Module], optimizer=None,
                         scheduler=None, *, model_args=None, weights_only: bool = False) -> dict:
    """Load ``ckpt_dir`` (already validated) into the given objects; returns the train state."""
    ckpt_dir = Path(ckpt_dir)
    chunks = list(model_chunks)
    common = load_common(ckpt_dir)
    info = common[RATPLUS_KEY]
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {ckpt_dir} has format version {info['format_version']}, "
                              f"newer than this code understands ({FORMAT_VERSION}): "
                              f"upgrade megatron-ratplus")
    _check_architecture(ckpt_dir, info, chunks, model_args)
    if scheduler is not None and not weights_only:
        _check_schedule(ckpt_dir, scheduler, common.get("scheduler"))

    load_optimizer = optimizer is not None and not weights_only
    if load_optimizer:
        stored_opt = info.get("optimizer")
        if not stored_opt:
            raise CheckpointError(f"checkpoint {ckpt_dir} holds no optimizer state (a weights-only "
                                  f"checkpoint): load it as initial weights (checkpoint.init_from / "
                                  f"load_weights_only) instead of resuming")
        if stored_opt["kind"] != optimizer_kind(optimizer):
            raise CheckpointError(f"checkpoint {ckpt_dir} was saved with the {stored_opt['kind']} optimizer, "
                                  f"this run uses the {optimizer_kind(optimizer)} one: resume with the same "
                                  f"optimizer setting, or load weights only")
        meta = dict(stored_opt["metadata"])
        if meta.get("distrib_optim_sharding_type") == "dp_reshardable" and stored_opt.get("stepped") is not False:
            saved_layout, layout = info.get("layout") or {}, parallel_layout()
            changed = [f"{k} {saved_layout.get(k)} -> {layout[k]}" for k in MODEL_PARALLEL_FIELDS
                       if saved_layout.get(k) != layout[k]]
            if changed:
                raise CheckpointError(
                    f"checkpoint {ckpt_dir} holds distributed optimizer state in the dp_reshardable format, "
                    f"which resumes under another data-parallel size only, not another model-parallel layout "
                    f"({', '.join(changed)}): resume with the saved layout, or load its weights only "
                    f"(checkpoint.init_from; fresh optimizer). Checkpoints saved with "
                    f"checkpoint.optimizer_format=fully_reshardable resume under any layout")
        if stored_opt.get("stepped") is False:
            # Saved before the first update: no moments to restore, and the fp32 master weights were
            # still the model's own values. A fresh optimizer on the loaded weights is that state.
            _info("checkpoint %s was saved before the first optimizer update: the optimizer starts fresh "
                  "on its weights", ckpt_dir)
            load_optimizer = False
            meta = sharded_metadata(None)
    else:
        meta = sharded_metadata(None)
    runtime = runtime_metadata(meta)

    sharded = model_sharded_state_dict(chunks, runtime)
    if load_optimizer:
        prepare_for_loading(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(dict(sharded), is_loading=True, metadata=runtime)
    restore_rng = not weights_only and info.get("layout") == parallel_layout()
    if restore_rng:
        sharded[RNG_KEY] = rng_sharded_object()

    try:
        loaded, _missing, unexpected = dist_checkpointing.load(
            sharded, str(ckpt_dir), sharded_strategy=load_strategy(str(ckpt_dir)),
            strict=StrictHandling.RETURN_UNEXPECTED)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"reading checkpoint {ckpt_dir} failed: {type(e).__name__}: {e}") from e
    if collectives.any_rank(bool(unexpected)):
        names = sorted(unexpected)
        raise CheckpointError(f"checkpoint {ckpt_dir} lacks tensors the model needs"
                              + (f": {', '.join(names[:8])}{' …' if len(names) > 8 else ''}" if names else
                                 " (on another rank)"))

    for i, chunk in enumerate(chunks):
        unwrap_model(chunk).load_state_dict(loaded[model_state_key(i, len(chunks))], strict=True)
    if load_optimizer:
        # no_grad: the distributed optimizer copies into views of the fp32 parameters
        with torch.no_grad(), adam_steps_set_aside(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        restore_adam_steps(optimizer, loaded["optimizer"])
    elif optimizer is not None:
        # Fresh optimizer on loaded weights: its fp32 master copies must follow the new weights.
        optimizer.reload_model_params()
    if scheduler is not None and not weights_only:
        if loaded.get("scheduler") is None:
            _warn("checkpoint %s holds no LR scheduler state; the scheduler starts fresh", ckpt_dir)
        else:
            scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng:
        restore_rng_state(loaded[RNG_KEY])
    elif not weights_only:
        _info("parallel layout changed since the save (%s -> %s): RNG states not restored",
              info.get("layout"), parallel_layout())
    _info("loaded checkpoint %s (iteration %s%s)", ckpt_dir, info.get("iteration"),
          ", weights only" if weights_only or optimizer is None else "")
    return decode_train_state(loaded)


def load_weights_only(path_or_latest_dir, model_chunks: Sequence[torch.nn.Module], *, optimizer=None,
                      model_args=None) -> dict:
    """Load only the model weights of a checkpoint (adaptation, evaluation).

    ``path_or_latest_dir``: an ``iter_*`` directory, or a save_dir (its latest complete
    checkpoint). Pass a freshly built ``optimizer`` to have its fp32 master weights refreshed from
    the loaded weights (bf16 runs and the distributed optimizer keep separate copies). Returns the
    stored train state, for information.
    """
    ckpt_dir = resolve_checkpoint(path_or_latest_dir)
    if ckpt_dir is None:
        raise CheckpointError(f"no checkpoint to load in {path_or_latest_dir}")
    return load_checkpoint_into(ckpt_dir, model_chunks, optimizer, None, model_args=model_args,
                                weights_only=True)


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------
class CheckpointManager:
    """Periodic sharded saves into ``save_dir`` and resumption from them (see module doc)."""

    def __init__(self, save_dir, keep_last: Optional[int] = None, async_save: bool = False,
                 optimizer_format: str = DISTRIBUTED_OPTIMIZER_FORMATS[0]):
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                      or keep_last < 1):
            raise CheckpointError(f"keep_last must be a positive integer or None, got {keep_last!r}")
        if optimizer_format not in DISTRIBUTED_OPTIMIZER_FORMATS:
            raise CheckpointError(f"optimizer_format must be one of "
                                  f"{', '.join(DISTRIBUTED_OPTIMIZER_FORMATS)}, got {optimizer_format!r}")
        self.optimizer_format = optimizer_format     # the distributed optimizer's (state.py)
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.keep_last = keep_last
        self.async_requested = bool(async_save)
        self._async_queue = None
        self._pending_steps = []
        self._lock_state = None      # rank 0: None = not taken yet, True = held, False = no flock here
        if self.save_dir is not None and collectives.rank() == 0:
            _report_leftovers(self.save_dir)

    # -- owning the save_dir -----------------------------------------------------------------
    def claim_save_dir(self) -> None:
        """Make this run the only one using save_dir, until :meth:`close` or exit; collective.

        Rank 0 creates save_dir and takes the run lock (:func:`~.paths.lock_save_dir`); when
        another process holds it, every rank raises CheckpointError naming the holder, before
        anything in the directory is touched. The first save and a resume from ``latest`` claim
        it anyway; calling this at start-up refuses a second run before any work is done.
        """
        self._claim(create=True)

    def _claim(self, create: bool) -> None:
        error = None
        if collectives.rank() == 0:
            try:
                self._lock_local(create)
            except CheckpointError as e:
                error = str(e)
        _raise_together(error)

    def _lock_local(self, create: bool) -> None:
        """Rank 0's part of :meth:`claim_save_dir` (raises CheckpointError). ``create=False``: a
        save_dir that does not exist is left alone (nothing to protect yet)."""
        if self._lock_state is not None or self.save_dir is None:
            return
        try:
            if create:
                self.save_dir.mkdir(parents=True, exist_ok=True)
            elif not self.save_dir.is_dir():
                return
            self._lock_state = lock_save_dir(self.save_dir)
        except OSError as e:
            raise CheckpointError(f"cannot take the run lock {self.save_dir / LOCK_NAME}: {e}") from e

    def close(self) -> None:
        """Release the run lock (call :meth:`finalize` first); exiting the process releases it too."""
        if self._lock_state:
            unlock_save_dir(self.save_dir)
        self._lock_state = None

    # -- saving ------------------------------------------------------------------------------
    @property
    def async_active(self) -> bool:
        """Whether saves run in the background (``dist_checkpointing``'s async request, scheduled
        on an ``AsyncCallsQueue``: tensors are staged to host memory, a forked process writes
        them). It also works in CPU mode, so a laptop smoke test exercises the cluster's path."""
        return self.async_requested

    def save(self, step: int, model_chunks: Sequence[torch.nn.Module], optimizer, scheduler,
             train_state: Optional[dict]) -> Path:
        """Write ``<save_dir>/iter_{step:07d}``; collective. Returns the checkpoint directory.

        With async saves the tensors are written in the background and the tracker is updated
        when :meth:`finalize` (or the next save) completes the request.
        """
        if self.save_dir is None:
            raise CheckpointError("CheckpointManager has no save_dir: cannot save")
        _require_psutil()
        self.finalize()
        ckpt_dir = self.save_dir / iter_dir_name(step)
        train_state = dict(train_state or {})
        try:
            train_state_blob = encode_train_state(train_state)
            error = None
        except Exception as e:
            error = f"train_state is not picklable ({type(e).__name__}: {e})"
        if collectives.any_rank(error is not None):
            raise CheckpointError(error or "train_state is not picklable on another rank")
        self._prepare_directory(ckpt_dir)
        start_writer_helpers()

        chunks = list(model_chunks)
        # every rank's optimizer steps together; any_rank also covers a rank with an empty shard
        stepped = collectives.any_rank(optimizer_has_stepped(optimizer)) if optimizer is not None else None
        meta = sharded_metadata(optimizer, self.optimizer_format)
        runtime = runtime_metadata(meta)
        sharded = model_sharded_state_dict(chunks, runtime)
        if stepped:    # before the first update there is no state to keep (and the loading side starts fresh)
            sharded["optimizer"] = optimizer.sharded_state_dict(dict(sharded), is_loading=False,
                                                                metadata=runtime)
        sharded[RNG_KEY] = rng_sharded_object()
        sharded["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        sharded[TRAIN_STATE_KEY] = train_state_blob
        model_args = _model_args_dict(train_state.get("model_args"))
        sharded[RATPLUS_KEY] = collectives.broadcast_object({
            "format_version": FORMAT_VERSION,
            "iteration": int(step),
            "layout": parallel_layout(),
            "architecture": architecture_of(chunks, model_args),
            "model_args": model_args,
            "model_chunks": len(chunks),
            "optimizer": ({"kind": optimizer_kind(optimizer), "metadata": meta, "stepped": stepped}
                          if optimizer is not None else None),
            "versions": versions(),
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })

        use_async = self.async_active
        try:
            request = dist_checkpointing.save(
                sharded, str(ckpt_dir), sharded_strategy=save_strategy(), async_sharded_save=use_async,
                # train_state comes from rank 0; other ranks may hold their own data-loader view.
                preprocess_common_before_consistancy_check=lambda common: {
                    k: v for k, v in common.items() if k != TRAIN_STATE_KEY},
            )
        except Exception as e:
            raise CheckpointError(f"saving checkpoint {ckpt_dir} failed: {type(e).__name__}: {e}") from e
        if use_async:
            request.add_finalize_fn(partial(self._complete, int(step), ckpt_dir))
            if self._async_queue is None:
                from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
                self._async_queue = AsyncCallsQueue()
            self._async_queue.schedule_async_request(request)
            self._pending_steps.append(int(step))
            _info("checkpoint %s: writing in the background", ckpt_dir)
        else:
            self._complete(int(step), ckpt_dir)
        return ckpt_dir

    def _prepare_directory(self, ckpt_dir: Path) -> None:
        error = None
        if collectives.rank() == 0:
            try:
                self.save_dir.mkdir(parents=True, exist_ok=True)
                self._lock_local(create=True)      # first: another run's files are not ours to touch
                if ckpt_dir.exists():
                    problems = checkpoint_problems(ckpt_dir)
                    if not problems:
                        error = (f"checkpoint {ckpt_dir} already exists and is complete; refusing to "
                                 f"overwrite it (use another checkpoint.save_dir, or move it away)")
                    elif ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
                        ckpt_dir.rmdir()
                    else:
                        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
                        aside = ckpt_dir.with_name(f"{ckpt_dir.name}.incomplete-{stamp}")
                        os.rename(ckpt_dir, aside)
                        log.warning("%s exists but is incomplete (%s); moved it to %s and saving afresh",
                                    ckpt_dir, "; ".join(problems), aside)
                newer = self._tracked_checkpoint_after(iteration_of(ckpt_dir)) if error is None else None
                if newer is not None:
                    error = (f"{self.save_dir / TRACKER_NAME} names the complete checkpoint {newer}, newer "
                             f"than this save ({ckpt_dir.name}): saving would move the save_dir's latest "
                             f"checkpoint back to another timeline (use another checkpoint.save_dir, or "
                             f"move the newer checkpoints away)")
                if error is None:
                    ckpt_dir.mkdir()
            except CheckpointError as e:
                error = str(e)
            except OSError as e:
                error = f"cannot create checkpoint directory {ckpt_dir}: {e}"
        _raise_together(error)
        collectives.barrier()

    def _tracked_checkpoint_after(self, step: int) -> Optional[Path]:
        """The checkpoint the tracker names when it is complete and newer than ``step``. A tracker
        naming a checkpoint that was removed (a rollback by deleting the newer saves) or never
        completed does not count: moving it back is then right."""
        tracked, _ = read_tracker(self.save_dir)
        if tracked is None or tracked <= step:
            return None
        path = self.save_dir / iter_dir_name(tracked)
        return path if path.is_dir() and not checkpoint_problems(path) else None

    def _complete(self, step: int, ckpt_dir: Path) -> None:
        """After every rank wrote its part: verify, move the tracker, apply retention."""
        collectives.barrier()
        error = None
        if collectives.rank() == 0:
            problems = checkpoint_problems(ckpt_dir)
            if problems:
                error = f"checkpoint {ckpt_dir} failed verification after saving:\n  " + "\n  ".join(problems)
            else:
                write_tracker(self.save_dir, step)
                log.info("checkpoint %s complete: verified, %s moved to iteration %d",
                         ckpt_dir, TRACKER_NAME, step)
                for path in apply_retention(self.save_dir, step, self.keep_last):
                    log.info("retention (keep_last=%d): removed %s", self.keep_last, path)
        if step in self._pending_steps:
            self._pending_steps.remove(step)
        _raise_together(error)
        collectives.barrier()

    def finalize(self) -> None:
        """Wait for pending async saves and complete them (tracker, retention); collective."""
        if self._async_queue is not None and self._async_queue.get_num_unfinalized_calls():
            self._async_queue.maybe_finalize_async_calls(blocking=True)

    def maybe_finalize(self) -> None:
        """Complete async saves that already finished, without waiting; collective.

        Call it once per training step when saving asynchronously, so the tracker moves as soon
        as a background save is done rather than at the next save."""
        if self._async_queue is not None and self._async_queue.get_num_unfinalized_calls():
            self._async_queue.maybe_finalize_async_calls(blocking=False)

    @property
    def pending_saves(self) -> list:
        return list(self._pending_steps)

    # -- loading -----------------------------------------------------------------------------
    def resolve(self, which="latest") -> Optional[Path]:
        return resolve_checkpoint(which, self.save_dir)

    def load(self, which, model_chunks: Sequence[torch.nn.Module], optimizer=None, scheduler=None, *,
             model_args=None) -> Optional[dict]:
        """Restore model (and optimizer, scheduler, RNG) from ``which``; collective.

        ``which``: "latest" (this manager's save_dir; falls back past incomplete checkpoints;
        returns None when there is none), an ``iter_*`` directory (an error if it is broken) or
        another save_dir. ``model_args`` (optional) adds the unpadded vocabulary size to the
        architecture check. Returns the stored train state.
        """
        self.finalize()
        latest = which is None or which == "latest"
        if latest:
            # Resuming this save_dir's run makes it ours (and its tracker may have to move forward).
            self._claim(create=False)
        ckpt_dir = self.resolve(which)
        if ckpt_dir is None:
            return None
        state = load_checkpoint_into(ckpt_dir, model_chunks, optimizer, scheduler, model_args=model_args)
        if latest:
            self._catch_up_tracker(ckpt_dir)
        return state

    def _catch_up_tracker(self, ckpt_dir: Path) -> None:
        """After resuming from a checkpoint ahead of a lagging tracker (an interrupted save, see
        :func:`_same_run_ahead_of_tracker`), point the tracker at it; collective."""
        error = None
        if collectives.rank() == 0:
            tracked, _ = read_tracker(self.save_dir)
            step = iteration_of(ckpt_dir)
            if tracked is not None and step is not None and step > tracked:
                try:
                    write_tracker(self.save_dir, step)
                    log.warning("moved %s forward from iteration %d to %d", self.save_dir / TRACKER_NAME,
                                tracked, step)
                except OSError as e:
                    error = f"cannot update {self.save_dir / TRACKER_NAME}: {e}"
        _raise_together(error)
