"""Training metrics: throughput/MFU arithmetic, a live progress display and TensorBoard events.

Only rank 0 displays and writes; every rank may call the methods (they are no-ops elsewhere).

Model FLOPs (per token, forward + backward) follow DESIGN.md §4:
``3 · (2·(n_blocks+1)·d²·L + 2·ffn_mats·d·d_ffn·L + 2·d·V + 2·T·d·L)`` — see
:meth:`RATPlusModelArgs.flops_per_token`. A joint step runs two forward/backward passes over the
batch, so it counts twice. TFLOP/s are per GPU (divided by the world size); MFU divides by the
accelerator's dense bf16 peak when it is known.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch

from .. import atomic_files

# Dense bf16 datasheet peaks (TFLOP/s) by device-name substring.
_PEAKS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0))


def device_peak_tflops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in _PEAKS:
        if key in name:
            return peak
    return None


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass
class StepRecord:
    step: int
    losses: Dict[str, float]
    lr: float
    grad_norm: Optional[float]
    step_time: float
    tokens: int
    skipped: int = 0
    extra: Dict[str, float] = field(default_factory=dict)   # more scalars (joint: grad_norm/<mode>)


def drop_records_after(path, step: int) -> None:
    """Remove the records of steps after ``step`` from a metrics JSONL file (a resumed run writes
    them again), atomically; lines that are not step records are kept. A last line cut off by a
    kill mid-write (no newline at its end) is dropped too: the next record would be glued onto it."""
    path = Path(path)
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not line.endswith("\n") or (isinstance(record, dict) and isinstance(record.get("step"), int)
                                       and record["step"] > step):
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_files.replace_text(path, "".join(kept))


class MetricsLogger:
    """Progress display + log lines + TensorBoard, on rank 0."""

    def __init__(self, *, rank: int, world_size: int, total_steps: int, start_step: int,
                 tokens_per_step: int, flops_per_step: float, log_interval: int = 1,
                 tensorboard_dir: Optional[str] = None, progress: bool = True,
                 peak_tflops: Optional[float] = None, metrics_jsonl: Optional[str] = None,
                 wandb_project: Optional[str] = None, run_config: Optional[dict] = None,
                 replace_logged_attempt: bool = False):
        """``replace_logged_attempt``: the logs hold an attempt of this run that saved no checkpoint; its
        points after ``start_step`` are replaced as a resumed run's are (also at ``start_step`` 0)."""
        self.active = rank == 0
        self.world_size = world_size
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.log_interval = max(1, log_interval)
        self.peak_tflops = peak_tflops if peak_tflops is not None else device_peak_tflops()
        self.start_step = start_step
        self.start_time = time.time()
        self.recent_times = []
        self.writer = None
        self.progress = None
        self.console = None
        self.jsonl = None
        self.wandb = None
        if not self.active:
            return
        if metrics_jsonl:
            Path(metrics_jsonl).parent.mkdir(parents=True, exist_ok=True)
            if start_step or replace_logged_attempt:
                drop_records_after(metrics_jsonl, start_step)
            self.jsonl = open(metrics_jsonl, "a")
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed") from e
            self.wandb = wandb.init(project=wandb_project, config=run_config or {})
        from rich.console import Console
        self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            # A resumed run (possibly rolled back) hides the earlier run's points after its step.
            resumes = start_step or replace_logged_attempt
            self.writer = SummaryWriter(log_dir=tensorboard_dir, purge_step=start_step + 1 if resumes else None)
        if progress and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    # ------------------------------------------------------------------ arithmetic
    def throughput(self, step_time: float) -> Dict[str, float]:
        tokens_per_s = self.tokens_per_step / step_time
        tflops_per_gpu = self.flops_per_step / step_time / self.world_size / 1e12
        out = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / self.world_size,
               "tflops_per_gpu": tflops_per_gpu}
        if self.peak_tflops:
            out["mfu"] = tflops_per_gpu / self.peak_tflops
        return out

    @staticmethod
    def memory_gib() -> Optional[float]:
        if not torch.cuda.is_available():
            return None
        return torch.cuda.max_memory_allocated() / 2 ** 30

    # ------------------------------------------------------------------ output
    def print(self, message: str) -> None:
        if self.active:
            self.console.print(message, markup=False, highlight=False)

    def log_step(self, rec: StepRecord) -> None:
        if not self.active:
            return
        self.recent_times = (self.recent_times + [rec.step_time])[-20:]
        avg_time = sum(self.recent_times) / len(self.recent_times)
        tp = self.throughput(avg_time)
        eta = avg_time * (self.total_steps - rec.step)
        loss_text = " ".join(f"{k} {v:.4f}" for k, v in rec.losses.items())
        mem = self.memory_gib()
        if self.progress is not None:
            self.progress.update(self.task, completed=rec.step, status=loss_text)
        if self.writer is not None:
            for name, value in rec.losses.items():
                self.writer.add_scalar(f"loss/{name}", value, rec.step)
            self.writer.add_scalar("lr", rec.lr, rec.step)
            if rec.grad_norm is not None:
                self.writer.add_scalar("grad_norm", rec.grad_norm, rec.step)
            for name, value in tp.items():
                self.writer.add_scalar(f"throughput/{name}", value, rec.step)
            if mem is not None:
                self.writer.add_scalar("memory/max_allocated_gib", mem, rec.step)
            for name, value in rec.extra.items():
                self.writer.add_scalar(name, value, rec.step)
        record = {"step": rec.step, "losses": rec.losses, "lr": rec.lr, "grad_norm": rec.grad_norm,
                  "step_time": rec.step_time, "skipped": rec.skipped, **tp, **rec.extra}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({**{f"loss/{k}": v for k, v in rec.losses.items()}, "lr": rec.lr,
                            "grad_norm": rec.grad_norm, **tp}, step=rec.step)
        if rec.step % self.log_interval and rec.step != self.total_steps:
            return
        parts = [f"step {rec.step}/{self.total_steps}", loss_text,
                 f"lr {rec.lr:.3e}",
                 f"grad_norm {rec.grad_norm:.3f}" if rec.grad_norm is not None else "grad_norm -",
                 f"{tp['tokens_per_s']:,.0f} tok/s",
                 f"{tp['tflops_per_gpu']:.3g} TFLOP/s/GPU",
                 f"MFU {100 * tp['mfu']:.1f}%" if "mfu" in tp else "MFU -",
                 f"mem {mem:.1f} GiB" if mem is not None else "mem -",
                 f"ETA {format_duration(eta)}"]
        if rec.skipped:
            parts.append(f"skipped {rec.skipped}")
        self.print(" | ".join(parts))

    def log_eval(self, step: int, losses: Dict[str, float]) -> None:
        if not self.active:
            return
        if self.writer is not None:
            for name, value in losses.items():
                self.writer.add_scalar(f"val_loss/{name}", value, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "val_losses": losses}) + "\n")
            self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({f"val_loss/{k}": v for k, v in losses.items()}, step=step)
        self.print(f"validation at step {step}: " +
                   " ".join(f"{k} {v:.4f} (ppl {math.exp(min(v, 50)):.2f})" for k, v in losses.items()))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
