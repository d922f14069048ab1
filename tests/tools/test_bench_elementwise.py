"""tools/bench/bench_elementwise.py: the RoPE benchmark runs on CPU and prints one row per
formulation, with the bandwidth of the bytes each pass moves."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_smoke_run_prints_both_formulations():
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'kernels'}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "bench_elementwise.py"), "--tokens", "64",
                           "--hidden", "64", "--heads", "2", "--calls", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RoPE on q, k [64, 2, 2, 32] bf16" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("cos/sin inside", "tables"))]
    assert len(rows) == 2
    for row in rows:
        fwd_ms, fwd_gbs, bwd_ms, bwd_gbs = (float(v) for v in row[34:].split()[:4])
        assert fwd_ms > 0 and bwd_ms > 0
        tensor_bytes = 64 * 2 * 2 * 32 * 2
        assert abs(fwd_gbs - 4 * tensor_bytes / fwd_ms / 1e6) <= 1.0   # 4 tensor passes, printed rounded
