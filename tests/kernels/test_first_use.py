"""FirstUseChoice: time candidates once per shape key, cache the fastest, default without a timer."""
from __future__ import annotations

import pytest
from ratplus_kernels.first_use import FirstUseChoice, can_time_on_gpu


class _Timer:
    """Fake timer: runs the candidate once and returns its preset time (or raises it)."""

    def __init__(self, **times):
        self.times, self.calls = times, []

    def __call__(self, fn):
        fn()
        self.calls.append(fn.__name__)
        t = self.times[fn.__name__]
        if isinstance(t, Exception):
            raise t
        return t


def _candidates(ran):
    def default():
        ran.append("default")

    def fast():
        ran.append("fast")

    def broken():
        ran.append("broken")
    return {"default": default, "fast": fast, "broken": broken}


def test_times_once_per_key_and_runs_the_fastest():
    timer, ran = _Timer(default=2.0, fast=1.0, broken=3.0), []
    choice = FirstUseChoice("op", timer=timer, can_time=lambda: True)
    assert choice.run("a", _candidates(ran)) == "fast"
    assert timer.calls == ["default", "fast", "broken"] and ran[-1] == "fast"
    assert choice.run("a", _candidates(ran)) == "fast" and len(timer.calls) == 3
    assert choice.timings["a"] == {"default": 2.0, "fast": 1.0, "broken": 3.0}
    choice.run("b", _candidates(ran))
    assert len(timer.calls) == 6                              # a new key is timed again


def test_cached_choice_not_offered_runs_the_default():
    timer = _Timer(default=2.0, fast=1.0, broken=3.0)
    choice = FirstUseChoice("op", timer=timer, can_time=lambda: True)
    cands = _candidates([])
    assert choice.choose("a", cands) == "fast"
    assert choice.choose("a", {"default": cands["default"], "broken": cands["broken"]}) == "default"
    assert len(timer.calls) == 3


def test_failing_candidate_is_dropped_with_a_warning():
    timer = _Timer(default=2.0, fast=1.5, broken=RuntimeError("out of resources"))
    choice = FirstUseChoice("op", timer=timer, can_time=lambda: True)
    with pytest.warns(RuntimeWarning, match="op 'broken' failed"):
        assert choice.choose("a", _candidates([])) == "fast"
    assert "broken" not in choice.timings["a"]


def test_failing_default_raises():
    timer = _Timer(default=ValueError("bad input"), fast=1.0, broken=1.0)
    choice = FirstUseChoice("op", timer=timer, can_time=lambda: True)
    with pytest.raises(ValueError, match="bad input"):
        choice.choose("a", _candidates([]))


def test_without_timer_the_default_runs_and_nothing_is_cached():
    timer = _Timer(default=2.0, fast=1.0, broken=3.0)
    choice = FirstUseChoice("op", timer=timer, can_time=lambda: False)
    assert choice.choose("a", _candidates([])) == "default"
    assert not choice.choices and not timer.calls


def test_forced_mode_and_single_candidate():
    timer, ran = _Timer(default=2.0, fast=1.0, broken=3.0), []
    choice = FirstUseChoice("op", mode="broken", timer=timer, can_time=lambda: True)
    assert choice.run("a", _candidates(ran)) == "broken" and ran == ["broken"]
    cands = _candidates(ran)
    assert choice.choose("a", {"default": cands["default"]}) == "default"   # not offered here
    choice.mode = "auto"
    assert choice.choose("b", {"default": cands["default"]}) == "default"   # nothing to time
    assert choice.run("c", cands, forced="fast") == "fast" and not timer.calls


def test_no_timer_under_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert can_time_on_gpu() is False
