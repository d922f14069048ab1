"""GPU time of a callable, without the host's launch time.

``triton.testing.do_bench`` brackets each call with CUDA events, so when the host takes longer to
enqueue a call (Python, autograd, Triton's launcher, host-encoded TMA descriptors) than the GPU
takes to run it, the events measure the host. At the recurrence's anchor shape (about 0.6 ms of GPU
work per forward+backward) that made medians vary between runs by up to 50% (docs/benchmarks.md,
fourth and fifth sessions), and it made the first-use choices rank candidates by host cost: the
dilated W = 0 backward kept a pointer kernel that is 11% slower on the GPU than the TMA one because
the TMA launch costs more host time (seventh session).

Here a calibrated ``torch.cuda._sleep`` kernel is queued before every call, longer than the host
needs to enqueue it: when the start event fires, the whole call is already queued, and the events
bracket GPU work only. L2 is flushed before every call (as do_bench does). This is the time that
matters in training, where the host runs ahead of the GPU (other layers' GEMMs keep it busy) and
under CUDA graphs, where there is no launch cost at all.

Used by the kernels' first-use choices and block autotuning, and by the benchmark scripts.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["autotune_bench", "gpu_median", "gpu_times", "percentile"]

_SLEEP_CYCLES_PER_MS: dict[int, float] = {}


def _sleep_cycles_per_ms() -> float:
    """Cycles of ``torch.cuda._sleep`` per millisecond on the current device (measured once)."""
    dev = torch.cuda.current_device()
    if dev not in _SLEEP_CYCLES_PER_MS:
        cycles = 2_000_000
        torch.cuda._sleep(cycles)                            # warm up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_MS[dev] = cycles / start.elapsed_time(end)
    return _SLEEP_CYCLES_PER_MS[dev]


def _flush_bytes() -> int:
    """Twice the L2 of the current device (256 MiB where the size is not reported)."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
    return 2 * l2 if l2 else 256 << 20


def gpu_times(fn: Callable[[], object], calls: int = 100, warmup: int = 5) -> list[float]:
    """Per-call GPU milliseconds of ``fn()`` (sorted), each call preceded by an L2 flush and a
    sleep kernel that outlasts the host's enqueue time of one call."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    flush = torch.empty(_flush_bytes(), dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    host_ms = (time.perf_counter() - t0) / 3 * 1e3
    torch.cuda.synchronize()
    sleep_cycles = int(_sleep_cycles_per_ms() * (2.0 * host_ms + 0.05))
    events = []
    for _ in range(calls):
        flush.zero_()
        torch.cuda._sleep(sleep_cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in events)


def percentile(sorted_ms: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of sorted timings."""
    if not sorted_ms:
        raise ValueError("no timings")
    return sorted_ms[min(len(sorted_ms) - 1, int(p / 100 * len(sorted_ms)))]


def gpu_median(fn: Callable[[], object], calls: int = 100, warmup: int = 5) -> float:
    """Median GPU milliseconds of ``fn()`` (see :func:`gpu_times`)."""
    return percentile(gpu_times(fn, calls, warmup), 50)


def autotune_bench(kernel_call: Callable[[], object], quantiles: Sequence[float]) -> list[float]:
    """``do_bench`` for ``triton.autotune``: GPU-time quantiles (fractions) of ``kernel_call``."""
    ts = gpu_times(kernel_call, calls=25, warmup=3)
    return [percentile(ts, 100 * q) for q in quantiles]
