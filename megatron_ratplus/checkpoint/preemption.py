"""Stop cleanly when the scheduler preempts the job (Slurm sends SIGTERM, or SIGUSR1 ahead of
time with ``--signal``) or when the allotted wall time runs out.

The signal handler only raises a flag; the training loop polls :meth:`PreemptionHandler.should_stop`
once per step, which agrees across ranks (all_reduce MAX of the flag), so every rank stops after
the same step, saves, and exits 0.

    handler = PreemptionHandler().install()
    for step in ...:
        train_step()
        if handler.should_stop() or handler.time_exceeded(cfg.checkpoint.exit_duration_minutes):
            mgr.save(...); mgr.finalize(); sys.exit(0)

Slurm (and a terminal's Ctrl-C) signal every process of the job, not just the trainer: helper
processes that the checkpoint writer needs for that last save must survive the signal. They are
started inside :func:`spawning_shielded_helpers` (see :func:`.manager.start_writer_helpers`).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Optional, Sequence

from .. import collectives

log = logging.getLogger(__name__)

# Every signal that means "stop": the handler's defaults, Ctrl-C, and Slurm's --signal choice.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def _signals_blocked(signals: Sequence[int]):
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_resource_tracker_shielded(signals: Sequence[int] = PREEMPTION_SIGNALS) -> None:
    """Start multiprocessing's resource tracker (if not yet running) immune to the preemption signals.

    mosaicml-streaming registers its shared memory with that tracker, one process per trainer.
    The tracker ignores SIGINT and SIGTERM itself, but SIGUSR1/SIGUSR2 (Slurm's ``--signal``
    choice, sent to every process of the step) killed it: the next unregister relaunched it
    ("resource_tracker: process died unexpectedly"), the new one knew none of the segments, printed
    a KeyError traceback for each, and segments of a crashed run were no longer cleaned up. Call
    this before anything else starts the tracker (the data pipeline); a no-op when it is running.
    ``ensure_running`` unblocks SIGINT/SIGTERM when it returns, so the previous mask is restored
    here rather than by undoing only what was blocked.
    """
    from multiprocessing import resource_tracker
    with _signals_blocked(signals):
        resource_tracker.ensure_running()


@contextlib.contextmanager
def spawning_shielded_helpers(signals: Sequence[int] = PREEMPTION_SIGNALS):
    """Processes started inside this block never receive the preemption signals.

    The signals are *blocked* in the calling thread while the helper is forked: the child keeps
    the blocked mask through exec, so a SIGTERM sent to the whole process group stays pending in
    it forever instead of killing it. (Setting them to SIG_IGN instead would do the same for the
    child, but the disposition is process-wide: a preemption signal that reached another thread
    of the trainer during the spawn would be lost. A blocked one is delivered when the block
    ends.) Multiprocessing's resource tracker, which unblocks SIGINT/SIGTERM while it starts, is
    started first (:func:`start_resource_tracker_shielded`).
    """
    start_resource_tracker_shielded(signals)
    with _signals_blocked(signals):
        yield


def start_compile_workers_shielded(signals: Sequence[int] = PREEMPTION_SIGNALS) -> bool:
    """Start torch.compile's (Inductor's) compile-worker pool now, immune to the preemption signals.

    On the GPU the fused elementwise ops and Megatron's cross entropy are torch.compile'd, and
    Inductor compiles in a pool of worker processes in the trainer's process group. A SIGUSR1 sent to
    the whole job (Slurm's ``--signal``) killed them ("SubprocPool unclean exit"), and the next
    compile -- a new shape, the evaluation, the dense pass after the sparse one -- failed with
    "Attempting to use a closed pool" before the preemption checkpoint was written. Started in
    :func:`spawning_shielded_helpers`, the pool (and the processes it forks later) keeps the signals
    blocked; Inductor's workers already exit when their parent dies. Returns whether a pool was
    started (False: Inductor unavailable, or configured to compile in-process).
    """
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.async_compile import AsyncCompile
    except ImportError:
        return False
    if getattr(inductor_config, "compile_threads", 1) <= 1 or not hasattr(AsyncCompile, "warm_pool"):
        return False
    with spawning_shielded_helpers(signals):
        AsyncCompile.warm_pool()
    return True


class PreemptionHandler:
    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1"), start_time: Optional[float] = None):
        self.signals = []
        for name in signals:
            sig = getattr(signal, name, None) if isinstance(name, str) else signal.Signals(name)
            if sig is None:
                raise ValueError(f"unknown signal {name!r}")
            self.signals.append(signal.Signals(sig))
        self.start_time = time.time() if start_time is None else float(start_time)
        self.received: Optional[str] = None
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            # No logging machinery here: the handler may interrupt a logging call.

    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only); returns self."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
        return False

    @property
    def signal_received(self) -> bool:
        """This rank's own flag (no communication)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """True on every rank when any rank received one of the signals; collective."""
        stop = collectives.any_rank(self.received is not None)
        if stop and not getattr(self, "_logged", False):
            self._logged = True
            if collectives.rank() == 0:
                log.warning("preemption signal received (%s): stopping after this step",
                            self.received or "on another rank")
        return stop

    def elapsed_minutes(self) -> float:
        return (time.time() - self.start_time) / 60.0

    def time_exceeded(self, minutes: Optional[float]) -> bool:
        """True on every rank once any rank has run longer than ``minutes``; collective.

        ``None`` (no limit) returns False without communicating, on every rank alike.
        """
        if minutes is None:
            return False
        return collectives.any_rank(self.elapsed_minutes() >= float(minutes))
