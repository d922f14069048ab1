"""GPU time of a callable, without the host's launch time.

``triton.testing.do_bench`` brackets each call with CUDA events, so when the host takes longer to
enqueue a call (Python, autograd, launchers) than the GPU takes to run it, the events measure the
host. At the recurrence's anchor shape (about 0.6 ms of GPU work per forward+backward) that made
medians vary between runs by up to 50% (docs/benchmarks.md, fourth and fifth sessions). Here a
calibrated ``torch.cuda._sleep`` kernel is queued before every call, longer than the host needs to
enqueue it: when the start event fires, the whole call is already queued, and the events bracket
GPU work only. L2 is flushed before every call (as do_bench does).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List

import torch

_SLEEP_CYCLES_PER_MS: Dict[int, float] = {}


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


def gpu_times(fn: Callable[[], object], calls: int = 100, warmup: int = 5) -> List[float]:
    """Per-call GPU milliseconds of ``fn()`` (sorted), each call preceded by an L2 flush and a
    sleep kernel that outlasts the host's enqueue time of one call."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
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


def percentile(sorted_ms: List[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of sorted timings."""
    return sorted_ms[min(len(sorted_ms) - 1, int(p / 100 * len(sorted_ms)))]


def gpu_median(fn: Callable[[], object], calls: int = 100) -> float:
    """Median GPU milliseconds of ``fn()`` (see :func:`gpu_times`)."""
    return percentile(gpu_times(fn, calls), 50)


def histogram(sorted_ms: List[float], width_ms: float = 0.025) -> List[str]:
    """Text histogram lines of sorted timings in bins of ``width_ms``."""
    lo = math.floor(sorted_ms[0] / width_ms) * width_ms
    bins: Dict[float, int] = {}
    for t in sorted_ms:
        b = lo + math.floor((t - lo) / width_ms) * width_ms
        bins[b] = bins.get(b, 0) + 1
    n = len(sorted_ms)
    return [f"{b:.3f}-{b + width_ms:.3f} ms {c:4d} " + "#" * max(1, c * 60 // n)
            for b, c in sorted(bins.items())]
