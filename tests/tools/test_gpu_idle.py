"""tools/bench/gpu_idle.py: GPU idle gaps are found between merged busy intervals and charged to
the host phase running when the GPU ran dry."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "bench"))

from gpu_idle import (PHASE_PREFIX, format_idle_table, idle_by_phase, idle_gaps, merge_intervals,
                      profiler_intervals)


def test_overlapping_and_touching_intervals_merge():
    assert merge_intervals([(5, 7), (0, 2), (1, 3), (3, 4), (10, 11)]) == [(0, 4), (5, 7), (10, 11)]


def test_gaps_lie_between_busy_intervals_only():
    assert idle_gaps([(0, 2), (5, 6), (1, 3)]) == [(3, 5)]
    assert idle_gaps([]) == []
    assert idle_gaps([(0, 1)]) == []


def test_reversed_interval_is_rejected():
    with pytest.raises(ValueError, match="ends before it starts"):
        merge_intervals([(3, 1)])


def test_gap_goes_to_the_innermost_phase_holding_its_start():
    busy = [(0, 10), (12, 20), (25, 30), (31, 40), (50, 51)]
    phases = [("step", 0, 38), ("optimizer", 24, 35)]
    result = idle_by_phase(busy, phases)
    assert result["step"].idle_us == 2 + 5          # gaps at 10 and 20
    assert result["step"].gaps == 2 and result["step"].largest_us == 5
    assert result["optimizer"].idle_us == 1          # gap at 30, inside both ranges
    assert result["(no phase)"].idle_us == 10        # gap at 40, after every phase
    table = format_idle_table(busy, result)
    assert "GPU span 0.1 ms" in table and "| optimizer | 0.00 | 1 | 1 |" in table


def test_profiler_events_split_into_phases_and_ignore_cpu_ops():
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(PHASE_PREFIX + "work"):
            torch.ones(64, 64) @ torch.ones(64, 64)
        with record_function("not_a_phase"):
            torch.zeros(3)
    busy, phases = profiler_intervals(prof.events())
    assert busy == []                                 # no CUDA activity on a CPU run
    assert [name for name, _, _ in phases] == ["work"]
    assert phases[0][1] <= phases[0][2]
