"""Sample the GPU's SM clock, power and clock-event reasons while a benchmark runs.

Why: the same kernels take a few percent longer on one machine than another of the same kind, and
in two profiles the GEMMs of a sparse training pass ran 6-8% slower than the same GEMMs of a dense
pass (a later profile did not reproduce it). Whether the GPU lowered its clocks (power cap, thermal
slowdown) is a reading of the device, not of the code, so benchmarks that compare such numbers can
print it next to their timings. ``nvidia-smi`` samples in a background process (``-lms``); nothing
is read on the benchmark's own thread.
"""
from __future__ import annotations

import shutil
import signal
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

# NVML's clocks-event (formerly clocks-throttle) reason bits, as nvidia-smi prints them in hex.
REASON_BITS = {
    0x1: "idle",
    0x2: "app clocks",
    0x4: "SW power cap",
    0x8: "HW slowdown",
    0x10: "sync boost",
    0x20: "SW thermal",
    0x40: "HW thermal",
    0x80: "HW power brake",
    0x100: "display clocks",
}
QUERY = "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"
LEGACY_QUERY = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"   # drivers before 535


@dataclass
class ClockReading:
    """Summary of one sampled interval."""
    samples: int
    sm_mhz_median: float
    sm_mhz_min: float
    power_w_median: float
    temperature_c_max: float
    reasons: list[str]           # every reason active in at least one sample ("idle" left out)

    def short(self) -> str:
        why = ",".join(self.reasons) if self.reasons else "none"
        return (f"{self.sm_mhz_median:.0f} MHz (min {self.sm_mhz_min:.0f}), {self.power_w_median:.0f} W, "
                f"max {self.temperature_c_max:.0f} C, reasons: {why}")


def decode_reasons(mask: int) -> list[str]:
    """Names of the bits set in an NVML clocks-event reason mask (unknown bits by value)."""
    names = [name for bit, name in REASON_BITS.items() if mask & bit]
    unknown = mask & ~sum(REASON_BITS)
    if unknown:
        names.append(hex(unknown))
    return names


def parse_samples(lines: Sequence[str]) -> ClockReading | None:
    """Summarise ``nvidia-smi --query-gpu=<QUERY> --format=csv,noheader,nounits`` lines; lines that do
    not parse (a header, '[N/A]' power on some boards, a partial last line) are skipped. None when no
    line parses."""
    clocks, powers, temps, reasons = [], [], [], set()
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        try:
            clock, temp, mask = float(fields[0]), float(fields[2]), int(fields[3], 16)
        except ValueError:
            continue
        clocks.append(clock)
        temps.append(temp)
        try:
            powers.append(float(fields[1]))
        except ValueError:
            pass
        reasons.update(r for r in decode_reasons(mask) if r != "idle")
    if not clocks:
        return None
    return ClockReading(samples=len(clocks), sm_mhz_median=statistics.median(clocks), sm_mhz_min=min(clocks),
                        power_w_median=statistics.median(powers) if powers else float("nan"),
                        temperature_c_max=max(temps), reasons=sorted(reasons))


def nvidia_smi_id(torch_index: int = 0) -> str:
    """The ``nvidia-smi --id`` of a torch CUDA device: its PCI address where torch reports it (right
    under ``CUDA_VISIBLE_DEVICES``), else the index."""
    import torch

    props = torch.cuda.get_device_properties(torch_index)
    if hasattr(props, "pci_bus_id"):
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    return str(torch_index)


class ClockSampler:
    """``with ClockSampler(device_id) as s: ...`` then ``s.reading``: nvidia-smi samples every
    ``interval_ms`` for the duration of the block, in its own process."""

    def __init__(self, device_id: str = "0", interval_ms: int = 100):
        if shutil.which("nvidia-smi") is None:
            raise RuntimeError("clock sampling needs nvidia-smi on PATH (it ships with the NVIDIA driver)")
        query = QUERY
        probe = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader", f"--id={device_id}"],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            query = LEGACY_QUERY
        self.command = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                        f"--loop-ms={interval_ms}", f"--id={device_id}"]
        self.reading: ClockReading | None = None
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> ClockSampler:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        self._process.send_signal(signal.SIGINT)     # nvidia-smi's loop ends cleanly on an interrupt
        try:
            out, err = self._process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            out, err = self._process.communicate()
        self.reading = parse_samples(out.splitlines())
        if self.reading is None and exc[0] is None:
            raise RuntimeError(f"nvidia-smi gave no clock samples ({' '.join(self.command)}): {err.strip()[:300]}")
