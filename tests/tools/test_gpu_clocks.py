"""tools/bench/gpu_clocks.py: nvidia-smi samples are parsed and summarised (clock, power, temperature,
clock-event reasons), and the sampler runs nvidia-smi in its own process for the length of a block
(exercised with a stand-in nvidia-smi on PATH, since CI has no GPU)."""
import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "bench"))
from gpu_clocks import ClockSampler, decode_reasons, parse_samples


def test_reasons_are_decoded_by_bit():
    assert decode_reasons(0) == []
    assert decode_reasons(0x4) == ["SW power cap"]
    assert decode_reasons(0x1 | 0x20 | 0x40) == ["idle", "SW thermal", "HW thermal"]
    assert decode_reasons(0x8 | 0x2000) == ["HW slowdown", "0x2000"]


def test_samples_are_summarised_and_bad_lines_skipped():
    lines = [
        "clocks.sm [MHz], power.draw [W], temperature.gpu, clocks_event_reasons.active",   # a header
        "1980, 650.5, 61, 0x0000000000000000",
        "1755, 699.9, 63, 0x0000000000000004",
        "1830, [N/A], 62, 0x0000000000000001",      # power not reported: the clock still counts
        "1830, 640.0, 6",                            # a partial last line
    ]
    reading = parse_samples(lines)
    assert reading.samples == 3
    assert reading.sm_mhz_median == 1830 and reading.sm_mhz_min == 1755
    assert reading.power_w_median == pytest.approx(675.2)
    assert reading.temperature_c_max == 63
    assert reading.reasons == ["SW power cap"]        # "idle" is left out
    assert "1830 MHz (min 1755)" in reading.short() and "SW power cap" in reading.short()
    assert parse_samples(["garbage", ""]) is None


FAKE_SMI = """#!/usr/bin/env bash
# stand-in for nvidia-smi: refuses the new field name when FAKE_LEGACY is set, records its arguments,
# then prints a sample line every 20 ms until interrupted
for arg in "$@"; do
  if [[ -n "${FAKE_LEGACY:-}" && "$arg" == *clocks_event_reasons* ]]; then echo "not a valid field" >&2; exit 2; fi
done
echo "$@" >> "$FAKE_LOG"
[[ "$*" == *loop-ms* ]] || { echo "1980, 500.0, 50, 0x0"; exit 0; }
trap 'exit 0' INT
i=0
while true; do
  if (( i % 2 )); then echo "1700, 700.0, 70, 0x0000000000000004"; else echo "1980, 600.0, 60, 0x0000000000000000"; fi
  i=$((i + 1)); sleep 0.02
done
"""


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    script = tmp_path / "nvidia-smi"
    script.write_text(FAKE_SMI)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


@pytest.mark.parametrize("legacy", [False, True])
def test_sampler_reads_the_samples_of_its_block(fake_smi, monkeypatch, legacy):
    if legacy:
        monkeypatch.setenv("FAKE_LEGACY", "1")
    import time
    with ClockSampler("00000000:65:00.0", interval_ms=20) as sampler:
        time.sleep(0.5)
    reading = sampler.reading
    assert reading.samples >= 4
    assert reading.sm_mhz_min == 1700 and reading.temperature_c_max == 70
    assert reading.reasons == ["SW power cap"]
    loop_call = [line for line in fake_smi.read_text().splitlines() if "loop-ms" in line][-1]
    assert "--id=00000000:65:00.0" in loop_call and "--loop-ms=20" in loop_call
    assert ("clocks_throttle_reasons" in loop_call) == legacy


def test_sampler_without_nvidia_smi_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="nvidia-smi on PATH"):
        ClockSampler()
