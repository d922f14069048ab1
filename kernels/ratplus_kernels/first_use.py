"""Choose among equivalent kernel pipelines by timing them once, on first use of each shape.

Some alternatives (a different decomposition of a backward, not just another block size that
``triton.autotune`` could try) can only be ranked on the GPU that runs them. Like
``torch.backends.cudnn.benchmark``, :class:`FirstUseChoice` times every candidate the first
time a shape key is seen, on the real inputs, caches the fastest and runs it from then on.
Candidates are ranked by GPU time, the host's launch time hidden (:mod:`.gpu_time`): in training
the host runs ahead of the GPU, and under CUDA graphs launches cost nothing, so a candidate whose
launch costs more host time (e.g. host-encoded TMA descriptors) but less GPU time is the faster
one. Every candidate must compute the same result into the same outputs (the last run wins),
and the first candidate is the safe default: it runs whenever there is no timer (CPU, Triton
interpreter, CUDA graph capture, torch.compile tracing), and nothing is cached then.

The choice is per process: data-parallel ranks may pick differently (results then differ at the
level of fp32 summation order, as with cudnn.benchmark).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Hashable, Optional

import torch

from ._env import interpreting
from .gpu_time import gpu_median

__all__ = ["FirstUseChoice", "can_time_on_gpu"]


def can_time_on_gpu() -> bool:
    """Whether candidates can be timed now: a real GPU, outside graph capture and compilation."""
    if interpreting() or not torch.cuda.is_available():
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    return not torch.compiler.is_compiling()


def _gpu_ms(fn: Callable[[], None]) -> float:
    return gpu_median(fn, calls=20, warmup=2)


class FirstUseChoice:
    """Per-shape choice among named candidates (zero-argument callables).

    ``mode``: "auto" (time on first use), or the name of a candidate to force wherever it is
    offered (elsewhere the default runs). ``choices`` / ``timings`` hold what "auto" decided
    and measured, per key. A candidate other than the default that raises while being timed
    (e.g. a launch configuration that does not fit this GPU's shared memory) is dropped for that
    key with a warning; the default's errors propagate.
    """

    def __init__(self, what: str, mode: str = "auto",
                 timer: Callable[[Callable[[], None]], float] = _gpu_ms,
                 can_time: Callable[[], bool] = can_time_on_gpu):
        self.what = what
        self.mode = mode
        self.timer = timer
        self.can_time = can_time
        self.choices: Dict[Hashable, str] = {}
        self.timings: Dict[Hashable, Dict[str, float]] = {}

    def choose(self, key: Hashable, candidates: Dict[str, Callable[[], None]]) -> str:
        """Name of the candidate to run for ``key`` (the first one is the default)."""
        default = next(iter(candidates))
        if self.mode in candidates:
            return self.mode
        if self.mode != "auto" or len(candidates) == 1:
            return default
        if key in self.choices:      # (a key may cover shapes that do not offer every candidate)
            return self.choices[key] if self.choices[key] in candidates else default
        if not self.can_time():
            return default
        times = {}
        for name, fn in candidates.items():
            try:
                times[name] = self.timer(fn)
            except Exception as e:  # noqa: BLE001 - see the class docstring
                if name == default:
                    raise
                warnings.warn(f"{self.what} '{name}' failed ({type(e).__name__}: {str(e)[:200]}); "
                              f"not used", RuntimeWarning, stacklevel=3)
        self.timings[key] = times
        self.choices[key] = min(times, key=times.get)
        return self.choices[key]

    def run(self, key: Hashable, candidates: Dict[str, Callable[[], None]],
            forced: Optional[str] = None) -> str:
        """Choose (or take ``forced``), run the chosen candidate, return its name."""
        name = forced if forced is not None else self.choose(key, candidates)
        candidates[name]()
        return name
