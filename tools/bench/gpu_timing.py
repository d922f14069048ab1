"""Benchmark timing helpers: GPU time without the host's launch time (the kernel library's
:mod:`ratplus_kernels.gpu_time`, which the kernels' own first-use choices use too) and a text
histogram of per-call timings."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from ratplus_kernels.gpu_time import gpu_median, gpu_times, percentile

__all__ = ["gpu_median", "gpu_times", "histogram", "percentile", "profile_once"]


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
