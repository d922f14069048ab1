"""Offline compilation of the kernels for sm_90 (ratplus_kernels.offline, tools/bench/kernel_resources.py).

The compile must happen outside the Triton interpreter (which tests/conftest.py turns on for the
whole CPU session), so it runs in a subprocess with TRITON_INTERPRET=0.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ratplus_kernels.offline import KernelResources

ROOT = Path(__file__).resolve().parents[2]


def _ptxas_available() -> bool:
    try:
        from ratplus_kernels.offline import ptxas_path
        return os.path.exists(ptxas_path())
    except (ImportError, FileNotFoundError):
        return False


needs_ptxas = pytest.mark.skipif(not _ptxas_available(), reason="this Triton ships no ptxas")


def _run(code: str = "", args=()):
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([str(ROOT / "kernels"), str(ROOT)]))
    cmd = [sys.executable] + (["-c", textwrap.dedent(code)] if code else list(args))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_ctas_per_sm_follows_the_sm90_limits():
    def res(regs, warps, shared):
        return KernelResources("k", warps, 1, regs, 0, 0, 0, shared)
    assert res(255, 8, 0).ctas_per_sm == 1            # 8 warps x 32 x 256 registers = 64K
    assert res(128, 4, 0).ctas_per_sm == 4
    assert res(128, 4, 96 * 1024).ctas_per_sm == 2    # shared memory binds first
    assert res(32, 1, 0).ctas_per_sm == 32             # CTA limit
    assert res(255, 8, 240 * 1024).ctas_per_sm == 0    # does not fit at all
    a100 = KernelResources("k", 4, 1, 128, 0, 0, 0, 96 * 1024, arch=80)
    assert a100.ctas_per_sm == 1                       # 164 KiB of shared memory per SM


def test_offline_compilation_rejects_unknown_arch():
    from ratplus_kernels.offline import offline_compilation
    with pytest.raises(ValueError, match="compute capabilities"):
        offline_compilation(75)


@needs_ptxas
def test_offline_compile_launches_nothing_and_reports_resources():
    """Inside offline_compilation a launch compiles for sm_90 and returns without running: the
    outputs keep their poison, and ptxas reports the kernel's registers."""
    proc = _run("""
        import torch
        import ratplus_kernels.dilated_attention.fused as fm
        from ratplus_kernels.offline import offline_compilation, kernel_resources
        fm._new_output = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype)
        q = torch.randn(300, 1, 2, 64, dtype=torch.bfloat16)
        with offline_compilation(90) as compiled:
            out, lse = fm._forward(q, q, q, 16, 32, 4, 0.125)
        assert len(compiled) == 1 and compiled[0].metadata.target.arch == 90
        assert torch.isnan(out.float()).all() and torch.isnan(lse).all()
        r = kernel_resources(compiled[0])
        assert r.name == "_fwd_kernel" and 0 < r.registers <= 255 and r.num_warps == 4
        print("regs", r.registers, "ctas", r.ctas_per_sm)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "regs" in proc.stdout


@needs_ptxas
def test_kernel_resources_tool_table():
    """The tool compiles every default launch configuration of both kernel families and flags
    exactly the spilling ones. The recurrence's uncapped multi-warp look-back candidates must not
    spill; the one-warp, register-capped and streaming ones may (by a few bytes to a few hundred,
    depending on the Triton version: they were chosen by GPU timings, docs/benchmarks.md)."""
    proc = _run(args=["tools/bench/kernel_resources.py"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    header, body = [c.strip() for c in rows[0]], [[c.strip() for c in r] for r in rows[1:]]
    col = {name: i for i, name in enumerate(header)}
    kernels = {(r[col["family"]], r[col["kernel"]]) for r in body}
    assert {("recurrence", "fwd_kernel"), ("recurrence", "bwd_kernel"), ("recurrence", "stream_fwd_kernel"),
            ("recurrence", "stream_bwd_kernel"), ("dilated", "fwd_kernel"),
            ("dilated", "bwd_dq_kernel"), ("dilated", "bwd_dkdv_kernel"), ("dilated", "bwd_far_kernel"),
            ("dilated", "bwd_w0_kernel")} <= kernels
    for r in body:
        assert 0 < int(r[col["regs"]]) <= 255
        spills = r[col["spill st/ld B"]] != "0/0"
        assert spills == ("SPILLS" in r[col["note"]]), r
        look_back = r[col["kernel"]] in ("fwd_kernel", "bwd_kernel")
        if r[col["family"]] == "recurrence" and look_back and int(r[col["warps"]]) > 1 \
                and "maxnreg" not in r[col["setting"]]:
            assert not spills, r


def test_kernel_resources_tool_rejects_unknown_family():
    proc = _run(args=["tools/bench/kernel_resources.py", "--kernels", "recurrence,flash"])
    assert proc.returncode == 2
    assert "unknown kernels ['flash']" in proc.stderr


@needs_ptxas
def test_kernel_resources_tool_optimizer_default_does_not_spill():
    """The fused AdamW update streams five tensors; its default block must fit in registers
    (larger blocks spill and run several times slower, docs/benchmarks.md)."""
    proc = _run(args=["tools/bench/kernel_resources.py", "--kernels", "optimizer"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines() if line.startswith("| optimizer")]
    assert len(rows) == 1 and "(default)" in rows[0][1] and rows[0][2] == "adamw_kernel"
    assert rows[0][6] == "0/0" and rows[0][9] == "", rows[0]


@needs_ptxas
def test_kernel_resources_tool_rmsnorm_rows_do_not_spill():
    """The RMSNorm kernels hold a whole row in registers: up to the widest row they accept
    (``--sweep``: also fp32), with and without the residual's gradient, forward and backward compile
    without spills, and the pipelined backward's prefetched rows stay within the shared memory it
    was given (``PIPELINE_SHARED_BYTES``, 80 KiB)."""
    proc = _run(args=["tools/bench/kernel_resources.py", "--kernels", "rmsnorm", "--sweep"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines() if line.startswith("| rmsnorm")]
    assert {r[2] for r in rows} == {"rms_norm_fwd_kernel", "rms_norm_bwd_kernel"}
    assert len(rows) == 2 * 2 * (2 + 4)           # fwd + bwd, residual or not, 2 preset and 4 sweep cases
    assert sum("+residual" in r[1] for r in rows) == len(rows) // 2
    for r in rows:
        assert r[6] == "0/0" and float(r[7]) <= 80, r
