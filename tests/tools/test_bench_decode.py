"""tools/bench/bench_decode.py: a CPU smoke run prints its table rows; bad arguments are usage errors."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "tools" / "bench" / "bench_decode.py")
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'kernels'}{os.pathsep}{ROOT}"}


def run(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_cpu_smoke_run_prints_a_row_per_setting():
    proc = run("--models", "tiny", "--contexts", "256", "--settings", "dense,D64", "--steps", "2", "--warmup", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny | 256 |")]
    assert [r.split("|")[3].strip() for r in rows] == ["dense", "D64"], proc.stdout


def test_bad_arguments_are_usage_errors():
    for flag, value, message in [("--models", "bogus", "list of tiny, 125m"),
                                 ("--settings", "D64,bogus", "list of dense, D16/W256/P4, D64"),
                                 ("--contexts", "4k", "positive integers"),
                                 ("--steps", "0", "an integer >= 1")]:
        proc = run(flag, value, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (flag, value, proc.stderr[-500:])
