"""The pretraining loop: joint (active recurrence) training, single-mode training, adaptation.

Per global batch:

* **joint** (``train.joint``): forward/backward the batch with sparse attention (the model's
  D/W/P, e.g. D=64 W=0 P=0) and take an optimizer step; then forward/backward the *same* batch
  with dense attention and take a second optimizer step. The LR schedule advances once per batch.
* otherwise one forward/backward and one optimizer step in ``train.mode`` (``dense`` for the
  attention baseline, ``sparse`` for resolution adaptation).

A non-finite loss or gradient norm skips that optimizer step (every rank sees the same all-reduced
loss and norm, so they agree) and is reported; ``train.max_nonfinite_steps`` consecutive ones halt the run. The loss is
read inside the optimizer step, just before the weights would change (:mod:`.update_guard`), so the
host queues the step's gradient work without waiting for the backward.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..model import set_attention_mode
from ..model.config import pad_vocab_size
from .config import RunConfig
from .metrics import MetricsLogger, StepRecord
from .setup import TrainingObjects
from .step import forward_backward
from .update_guard import LossRead, update_only_if_finite


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0
    consumed_tokens: int = 0
    optimizer_updates: int = 0
    skipped_updates: int = 0
    consecutive_nonfinite: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)   # last losses, for reports/tests


def modes_for(cfg: RunConfig) -> List[str]:
    return ["sparse", "dense"] if cfg.train.joint else [cfg.train.mode]


def training_forward_backward(objs: TrainingObjects, microbatches, mode: str, seq_len: int) -> torch.Tensor:
    """The training forward/backward in ``mode`` (already set on the model): the mean token loss
    as a device tensor. Replayed from a CUDA graph per mode when ``train.cuda_graph`` is on."""
    def run(batches):
        return forward_backward(objs.model, batches, seq_len=seq_len)
    if objs.step_graphs is None:
        return run(microbatches)
    return objs.step_graphs(mode, run, microbatches)


def train_update(objs: TrainingObjects, microbatches, mode: str, seq_len: int):
    """One forward/backward in ``mode`` and, if its loss and gradient norm are finite, one optimizer
    step. Returns ``(loss, gradient norm or None, updated)``."""
    set_attention_mode(objs.model, mode)
    for chunk in objs.model:
        chunk.zero_grad_buffer()
    objs.optimizer.zero_grad()
    loss = LossRead(training_forward_backward(objs, microbatches, mode, seq_len))
    with update_only_if_finite(objs.optimizer, loss):
        updated, grad_norm, _ = objs.optimizer.step()
    if not loss.is_finite():
        return loss.value(), None, False
    return loss.value(), grad_norm, bool(updated)


def gather_updated_weights(model_chunks) -> None:
    """With the distributed optimizer's overlapped parameter all-gather, each data-parallel rank's
    model weights hold only its own shard of the last update until the next forward gathers the
    rest. Gather them now (as Megatron-LM's ``force_param_sync`` before a checkpoint save)."""
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.use_distributed_optimizer and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def evaluate(objs: TrainingObjects, data, cfg: RunConfig, accum_steps: int) -> Dict[str, float]:
    """Validation loss per attention mode over ``logging.eval_iters`` global batches, as in
    Megatron-LM: each rank reads ``eval_iters * accum_steps`` micro-batches, so the loss covers the
    first ``eval_iters * global_batch_size`` validation samples whatever the parallel layout."""
    batches = data.validation_microbatches(cfg.logging.eval_iters * accum_steps)
    out = {}
    for chunk in objs.model:
        chunk.eval()
    with torch.no_grad():
        for mode in modes_for(cfg):
            set_attention_mode(objs.model, mode)
            out[mode] = forward_backward(objs.model, batches, seq_len=cfg.train.seq_len,
                                         forward_only=True).item()
    for chunk in objs.model:
        chunk.train()
    return out


class Trainer:
    """Owns the loop; checkpointing and data are injected so the loop stays small and testable."""

    def __init__(self, cfg: RunConfig, objs: TrainingObjects, data, *, world_size: int, rank: int,
                 total_steps: int, accum_steps: int, checkpoints=None, preemption=None,
                 state: Optional[TrainState] = None, replace_logged_attempt: bool = False):
        self.cfg, self.objs, self.data = cfg, objs, data
        self.total_steps, self.accum_steps = total_steps, accum_steps
        self.rank, self.world_size = rank, world_size
        self.checkpoints, self.preemption = checkpoints, preemption
        self.state = state or TrainState()
        t = cfg.train
        self.tokens_per_step = t.global_batch_size * t.seq_len
        args = objs.model_args
        flops_per_token = args.flops_per_token(t.seq_len, pad_vocab_size(args.vocab_size, cfg.parallel.tensor_parallel))
        self.flops_per_step = flops_per_token * self.tokens_per_step * len(modes_for(cfg))
        self.metrics = MetricsLogger(
            rank=rank, world_size=world_size, total_steps=total_steps, start_step=self.state.step,
            tokens_per_step=self.tokens_per_step, flops_per_step=self.flops_per_step,
            log_interval=cfg.logging.log_interval, tensorboard_dir=cfg.logging.tensorboard_dir,
            progress=cfg.logging.progress, peak_tflops=cfg.logging.peak_tflops,
            metrics_jsonl=cfg.logging.metrics_jsonl, wandb_project=cfg.logging.wandb_project,
            run_config=cfg.to_dict(), replace_logged_attempt=replace_logged_attempt)
        self.last_saved_step = self.state.step if self.state.step else None

    # ------------------------------------------------------------------ checkpoint glue
    def train_state_dict(self) -> dict:
        return {
            "step": self.state.step,
            "consumed_tokens": self.state.consumed_tokens,
            "optimizer_updates": self.state.optimizer_updates,
            "skipped_updates": self.state.skipped_updates,
            "consecutive_nonfinite": self.state.consecutive_nonfinite,
            "data_state": self.data.state_dict(),
            "run_config": self.cfg.to_dict(),
            "model_args": self.objs.model_args.to_dict(),
        }

    def save(self) -> None:
        if self.checkpoints is None:
            return
        gather_updated_weights(self.objs.model)     # the model state is written from these weights
        path = self.checkpoints.save(self.state.step, self.objs.model, self.objs.optimizer,
                                     self.objs.scheduler, self.train_state_dict())
        self.last_saved_step = self.state.step
        self.metrics.print(f"saved checkpoint at step {self.state.step}: {path}")

    def _should_stop_early(self) -> Optional[str]:
        if self.preemption is None:
            return None
        if self.preemption.should_stop():
            return "preemption signal received"
        minutes = self.cfg.checkpoint.exit_duration_minutes
        if minutes is not None and self.preemption.time_exceeded(minutes):
            return f"exit duration of {minutes} minutes reached"
        return None

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainState:
        cfg, st = self.cfg, self.state
        seq_len = cfg.train.seq_len
        stop_reason = None
        start_step = st.step
        try:
            while st.step < self.total_steps:
                t0 = time.time()
                microbatches = self.data.next_microbatches(self.accum_steps)
                losses, grad_norm, skipped, norms = {}, None, 0, {}
                for mode in modes_for(cfg):
                    loss, norm, updated = train_update(self.objs, microbatches, mode, seq_len)
                    losses[mode] = loss
                    if norm is not None:
                        norms[f"grad_norm/{mode}"] = float(norm)
                    if updated:
                        st.optimizer_updates += 1
                        grad_norm = norm
                    else:
                        skipped += 1
                lr = self.objs.optimizer.param_groups[0]["lr"]     # the LR this batch trained with
                self.objs.scheduler.step(increment=1)
                st.step += 1
                st.consumed_tokens += self.tokens_per_step
                st.skipped_updates += skipped
                bad_norms = {name: v for name, v in norms.items() if not math.isfinite(v)}
                if any(not math.isfinite(v) for v in losses.values()) or bad_norms:
                    st.consecutive_nonfinite += 1
                    what = f"loss {losses}" + (f", gradient norm {bad_norms}" if bad_norms else "")
                    self.metrics.print(f"step {st.step}: non-finite {what}; optimizer step skipped "
                                       f"({st.consecutive_nonfinite} in a row)")
                    if st.consecutive_nonfinite >= cfg.train.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{st.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient "
                            f"norm (limit train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); halting")
                else:
                    st.consecutive_nonfinite = 0
                st.history = (st.history + [dict(losses, step=st.step)])[-1000:]
                self.metrics.log_step(StepRecord(st.step, losses, lr, grad_norm, time.time() - t0,
                                                 self.tokens_per_step, skipped,
                                                 extra=norms if len(norms) > 1 else {}))
                if cfg.logging.eval_interval and st.step % cfg.logging.eval_interval == 0:
                    self.metrics.log_eval(st.step, evaluate(self.objs, self.data, cfg, self.accum_steps))
                interval = cfg.checkpoint.save_interval
                if interval and st.step % interval == 0 and st.step < self.total_steps:
                    self.save()
                if self.checkpoints is not None:
                    self.checkpoints.maybe_finalize()     # completes finished async saves (tracker)
                stop_reason = self._should_stop_early()
                if stop_reason:
                    break
            if stop_reason:
                self.metrics.print(f"stopping at step {st.step}: {stop_reason}; saving a checkpoint")
            if self.last_saved_step != st.step:
                self.save()
            eval_interval = cfg.logging.eval_interval
            finished_here = start_step < st.step and st.step >= self.total_steps
            if eval_interval and finished_here and not stop_reason and st.step % eval_interval:
                # The end of training, as in Megatron-LM: the final model's validation loss (for the
                # adaptation recipes, 477 steps evaluated every 100, the only one of the adapted model).
                self.metrics.log_eval(st.step, evaluate(self.objs, self.data, cfg, self.accum_steps))
            if self.checkpoints is not None:
                self.checkpoints.finalize()
        finally:
            self.metrics.close()
        return st

