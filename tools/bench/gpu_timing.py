"""Benchmark timing helpers: GPU time without the host's launch time (the kernel library's
:mod:`ratplus_kernels.gpu_time`, which the kernels' own first-use choices use too), the median of
either GPU or wall time, and a text histogram of per-call timings."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
from ratplus_kernels.gpu_time import gpu_median, gpu_times, percentile

__all__ = ["cuda_kernels", "gpu_median", "gpu_times", "histogram", "median_ms", "percentile", "profile_once",
           "profiled"]


def median_ms(fn: Callable[[], object], calls: int, warmup: int, cuda: bool) -> float:
    """Median ms of ``calls`` calls after ``warmup``: GPU time on CUDA (:func:`gpu_median`), wall time
    otherwise (the CPU smoke runs of the benchmark scripts, not benchmarks)."""
    if cuda:
        return gpu_median(fn, calls=calls, warmup=warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_once(step: Callable[[], object], warmup: int = 3) -> None:
    """Run ``step`` ``warmup`` times (compilation, autotuning, first-use choices), then once inside
    the CUDA profiler range, so that ``ncu --profile-from-start off`` profiles only that call."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def profiled(fn: Callable[[], object], iters: int, warmup: int = 3):
    """Warm ``fn`` up (compile, autotune), then run it ``iters`` times under the CUDA profiler;
    returns the per-kernel averages (``key_averages()``)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def cuda_kernels(events) -> list:
    """The device kernels among profiler events (no runtime API calls or activity markers)."""
    return [e for e in events if e.device_time_total > 0
            and not e.key.startswith(("cuda", "Activity", "cuLaunch"))]


def histogram(sorted_ms: list[float], width_ms: float = 0.025) -> list[str]:
    """Text histogram lines of sorted timings in bins of ``width_ms``."""
    lo = math.floor(sorted_ms[0] / width_ms) * width_ms
    bins: dict[float, int] = {}
    for t in sorted_ms:
        b = lo + math.floor((t - lo) / width_ms) * width_ms
        bins[b] = bins.get(b, 0) + 1
    n = len(sorted_ms)
    return [f"{b:.3f}-{b + width_ms:.3f} ms {c:4d} " + "#" * max(1, c * 60 // n)
            for b, c in sorted(bins.items())]
