"""Where the GPU waits for the host: idle gaps of a profiled step, attributed to the host's phase.

A training step is host-bound wherever the host queues work more slowly than the GPU runs it, and at
every blocking device-to-host read (the GPU drains, then idles while the host queues the next
kernels). The profiler's kernel totals cannot show this. Here the GPU's busy intervals (kernels,
copies, memsets) are merged, the gaps between them are found, and each gap is charged to the host
phase (a ``record_function`` range) that was running when the GPU ran out of work: that is what the
host was busy with while the GPU starved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

Interval = Tuple[float, float]
PHASE_PREFIX = "phase:"   # record_function names that mark host phases, e.g. "phase:optimizer"


@dataclass
class PhaseIdle:
    """GPU idle time charged to one host phase (microseconds)."""

    idle_us: float = 0.0
    gaps: int = 0
    largest_us: float = 0.0

    def add(self, length_us: float) -> None:
        self.idle_us += length_us
        self.gaps += 1
        self.largest_us = max(self.largest_us, length_us)


def merge_intervals(intervals: Iterable[Interval]) -> List[Interval]:
    """Union of ``(start, end)`` intervals, sorted, overlapping or touching ones joined."""
    merged: List[Interval] = []
    for start, end in sorted(intervals):
        if end < start:
            raise ValueError(f"interval ends before it starts: ({start}, {end})")
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def idle_gaps(busy: Iterable[Interval]) -> List[Interval]:
    """The gaps between the merged busy intervals, from the first busy start to the last busy end."""
    merged = merge_intervals(busy)
    return [(a_end, b_start) for (_, a_end), (b_start, _) in zip(merged, merged[1:])]


def idle_by_phase(busy: Iterable[Interval], phases: Sequence[Tuple[str, float, float]],
                  outside: str = "(no phase)") -> Dict[str, PhaseIdle]:
    """GPU idle time per host phase: each gap goes to the innermost phase whose ``(name, start, end)``
    range contains the gap's start; gaps outside every phase go to ``outside``."""
    result: Dict[str, PhaseIdle] = {}
    for gap_start, gap_end in idle_gaps(busy):
        holders = [(end - start, name) for name, start, end in phases if start <= gap_start < end]
        name = min(holders)[1] if holders else outside
        result.setdefault(name, PhaseIdle()).add(gap_end - gap_start)
    return result


def profiler_intervals(events) -> Tuple[List[Interval], List[Tuple[str, float, float]]]:
    """Split ``torch.profiler`` events into GPU busy intervals and the host phases, the
    ``record_function`` ranges named ``PHASE_PREFIX + name``."""
    from torch.autograd import DeviceType

    busy, phases = [], []
    for event in events:
        start, end = event.time_range.start, event.time_range.end
        if event.name.startswith(PHASE_PREFIX):
            # a range also appears on the GPU timeline (spanning its kernels, gaps included): not busy time
            if event.device_type == DeviceType.CPU:
                phases.append((event.name[len(PHASE_PREFIX):], start, end))
        elif event.device_type == DeviceType.CUDA:
            busy.append((start, end))
    return busy, phases


def format_idle_table(busy: Sequence[Interval], by_phase: Dict[str, PhaseIdle]) -> str:
    """Markdown-style table: GPU busy and span, then idle time per host phase, largest first."""
    merged = merge_intervals(busy)
    if not merged:
        return "no GPU activity recorded"
    span = merged[-1][1] - merged[0][0]
    busy_us = sum(end - start for start, end in merged)
    lines = [f"GPU span {span / 1e3:.1f} ms, busy {busy_us / 1e3:.1f} ms, idle {(span - busy_us) / 1e3:.1f} ms",
             "| host phase when the GPU ran dry | GPU idle ms | gaps | largest gap us |", "|---|---|---|---|"]
    for name, idle in sorted(by_phase.items(), key=lambda item: -item[1].idle_us):
        lines.append(f"| {name} | {idle.idle_us / 1e3:.2f} | {idle.gaps} | {idle.largest_us:.0f} |")
    return "\n".join(lines)
