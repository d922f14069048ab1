"""tools/bench/bench_rmsnorm.py: a CPU smoke run (Triton interpreter) prints every row, the
residual rows and the sweeps' rows among them."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"16x2x64\s+(.+?)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)x$")


def test_cpu_smoke_run_prints_every_row():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT / 'kernels'}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "bench_rmsnorm.py"), "--shapes", "16x2x64",
                           "--calls", "1", "--sweep-programs", "8", "--sweep-loop", "2:1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ROW.match(line) for line in proc.stdout.splitlines() if line.startswith("16x2x64")]
    assert all(rows), proc.stdout
    assert [m.group(1) for m in rows] == [
        "torch F.rms_norm", "Triton", "Triton, 8 progs/SM", "Triton, rows 2, stages 1",
        "torch + residual", "Triton + residual", "Triton + res, 8 progs/SM", "Triton + res, rows 2, stages 1"]
    for m in rows:
        assert float(m.group(2)) > 0 and float(m.group(4)) > 0


def test_bad_sweep_arguments_are_usage_errors():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT / 'kernels'}{os.pathsep}{ROOT}"}
    script = str(ROOT / "tools" / "bench" / "bench_rmsnorm.py")
    for flag, value, message in [("--sweep-loop", "2-1", "A:B positive integer pairs"),
                                 ("--sweep-loop", "3:1", "powers of two"),
                                 ("--sweep-programs", "8,x", "positive integers"),
                                 ("--sweep-warps", "0", "positive integers")]:
        proc = subprocess.run([sys.executable, script, flag, value], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (flag, value, proc.stderr[-500:])
