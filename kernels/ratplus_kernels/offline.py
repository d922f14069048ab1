"""Compile the Triton kernels for a GPU that is not there, and report their resources.

Register pressure decides how these kernels run on an H100: a launch configuration that spills
registers to local memory, or that fits one CTA per SM, loses bandwidth long before any timing
shows why. Triton's compiler and ``ptxas`` do not need a GPU, so the register count, spills,
stack and shared memory of every launch configuration can be read on any machine with the
``triton`` wheel (which ships ``ptxas``) — for the same Triton version as the GPU host, install it
beside (``pip install --target DIR triton==X``, ``PYTHONPATH=DIR``).

:func:`offline_compilation` turns every ``kernel[grid](...)`` launched inside it into a
compile-only call for the chosen target (nothing runs, outputs stay unwritten), so the host code
of the kernels is exercised exactly as on the GPU (the same constexprs, launch options and
argument specialisations). :func:`kernel_resources` reads ``ptxas -v`` for one compiled kernel.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import types
from dataclasses import dataclass
from typing import Iterator, List

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.jit import JITFunction

__all__ = ["offline_compilation", "kernel_resources", "KernelResources", "ptxas_path"]

# Per-SM limits: registers, shared memory usable by CTAs (with 1 KiB reserved per CTA), resident
# warps and CTAs, for compute capability 9.0 (H100/H200: 228 KiB) and 8.0 (A100: 164 KiB).
_SM_LIMITS = {
    90: dict(regs=65536, smem=233472, smem_per_cta_reserved=1024, warps=64, ctas=32),
    80: dict(regs=65536, smem=167936, smem_per_cta_reserved=1024, warps=64, ctas=32),
}


class _OfflineDriver(DriverBase):
    """The parts of Triton's CUDA driver that compilation asks for, answered without a GPU."""

    def __init__(self, arch: int):
        self._target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:  # only the launcher needs it
        raise RuntimeError("offline compilation builds no launcher: nothing can be launched")

    def get_current_target(self):
        return self._target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("nothing can be timed during offline compilation")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass


def offline_compilation(arch: int = 90, sm_count: int = 132):
    """Context manager: within the block, ``kernel[grid](...)`` compiles for CUDA compute
    capability ``arch`` (90 or 80) and returns the compiled kernel without launching it; the
    kernels are also appended to the yielded list. ``torch.cuda.get_device_properties`` reports
    ``sm_count`` SMs (host code sizes grids with it). Tensor arguments may live on the CPU (only
    their dtype and alignment matter). Not thread-safe: it patches Triton's active driver and
    ``JITFunction.run``."""
    if arch not in _SM_LIMITS:
        raise ValueError(f"offline compilation supports compute capabilities {sorted(_SM_LIMITS)} "
                         f"(x 10), got {arch}")
    return _offline_compilation(arch, sm_count)


@contextlib.contextmanager
def _offline_compilation(arch: int, sm_count: int) -> Iterator[List]:
    compiled: List = []
    original_run = JITFunction.run
    original_props = torch.cuda.get_device_properties

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(kernel)
        return kernel

    def properties(device=None):
        return types.SimpleNamespace(multi_processor_count=sm_count, name=f"offline sm_{arch}",
                                     major=arch // 10, minor=arch % 10)

    triton.runtime.driver.set_active(_OfflineDriver(arch))
    JITFunction.run = compile_only
    torch.cuda.get_device_properties = properties
    try:
        yield compiled
    finally:
        JITFunction.run = original_run
        torch.cuda.get_device_properties = original_props
        triton.runtime.driver.reset_active() if _has_default_driver() else _clear_active_driver()


def _has_default_driver() -> bool:
    try:
        triton.runtime.driver.default  # noqa: B018 - raises without an active backend
        return True
    except RuntimeError:
        return False


def _clear_active_driver():
    triton.runtime.driver._active = None


def ptxas_path() -> str:
    """The ``ptxas`` shipped with the installed Triton (or ``TRITON_PTXAS_PATH``)."""
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env:
        return env
    import triton.backends.nvidia as nvidia
    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no ptxas at {path}; set TRITON_PTXAS_PATH")
    return path


@dataclass
class KernelResources:
    name: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int          # bytes per thread
    spill_loads: int
    stack: int                 # bytes per thread
    shared: int                # bytes per CTA (Triton's dynamic shared memory)
    arch: int = 90             # compute capability x 10

    @property
    def ctas_per_sm(self) -> int:
        """Resident CTAs per SM (registers are allocated per warp in units of 256, shared memory
        with 1 KiB reserved per CTA)."""
        lim = _SM_LIMITS[self.arch]
        per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = lim["regs"] // max(per_warp * self.num_warps, 1)
        by_smem = lim["smem"] // (self.shared + lim["smem_per_cta_reserved"])
        return min(by_regs, by_smem, lim["warps"] // self.num_warps, lim["ctas"])

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


_PTXAS_PATTERNS = {
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "registers": r"Used (\d+) registers",
}


def kernel_resources(kernel) -> KernelResources:
    """Registers, spills and stack (``ptxas -v`` on the kernel's PTX) and shared memory."""
    md = kernel.metadata
    arch = f"sm_{md.target.arch}" + ("a" if md.target.arch >= 90 else "")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        proc = subprocess.run([ptxas_path(), f"-arch={arch}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {md.name}: {proc.stderr[-2000:]}")
    found = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        m = re.search(pattern, proc.stderr)
        found[key] = int(m.group(1)) if m else 0
    return KernelResources(name=md.name, num_warps=md.num_warps, num_stages=md.num_stages,
                           shared=int(md.shared), arch=md.target.arch, **found)
