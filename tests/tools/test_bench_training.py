"""tools/bench/bench_training.py: the training benchmark runs the real stack on CPU (tiny preset),
applies config overrides and reports them, and rejects a bad override with the config's error."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'kernels'}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "bench_training.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_cpu_run_prints_a_row_per_mode_with_host_time():
    proc = run_script("--preset", "ratplus-tiny", "--seq-len", "64", "--micro-batch", "1", "--steps", "1",
                      "--warmup", "1", "--modes", "dense,joint", "--dilated-pointer-loads",
                      "--override", "train.gradient_accumulation_fusion=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "wgrad fusion=True" in out and "overrides: train.gradient_accumulation_fusion=true" in out
    assert "dilated attention: pointer loads" in out
    header = next(line for line in out.splitlines() if line.startswith("mode"))
    assert header.split()[:3] == ["mode", "step", "ms"] and "host ms" in header
    assert "mem GiB" in header and "rsrv GiB" in header and "graph pools included" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("dense ", "joint "))}
    assert set(rows) == {"dense", "joint"}
    for cells in rows.values():
        step_ms, host_ms = float(cells[1]), float(cells[2])
        assert 0 < host_ms <= step_ms      # the host's queue time is part of the step
    assert "clipped" in header and "clip_grad=1.0" in out
    clipped = {mode: cells[-1].split("/") for mode, cells in rows.items()}
    assert clipped["dense"][1] == "1" and clipped["joint"][1] == "2"   # timed updates only (1 step)
    assert all(0 <= int(k) <= int(n) for k, n in clipped.values())


def test_bad_override_is_a_config_error():
    proc = run_script("--preset", "ratplus-tiny", "--seq-len", "64", "--steps", "1", "--warmup", "0",
                      "--override", "train.gradient_accumulation_fusion=sometimes")
    assert proc.returncode != 0
    assert "gradient_accumulation_fusion must be true, false or null" in proc.stderr


def test_anchor_only_for_the_anchors_setup():
    """The DESIGN.md anchors are the 1.5B model at micro-batch 2, one update per micro-batch, D=64
    sparse passes: other setups print no ratio."""
    sys.path.insert(0, str(ROOT / "tools" / "bench"))
    from bench_training import ANCHORS, anchor_tokens_per_s

    d64 = (64, 0, 0)
    assert anchor_tokens_per_s("joint", "ratplus-1.5b", None, 2, 1, d64) == ANCHORS["joint"]
    assert anchor_tokens_per_s("dense", "ratplus-1.5b", None, 2, 1, (16, 256, 4)) == ANCHORS["dense"]
    assert anchor_tokens_per_s("sparse", "ratplus-1.5b", None, 2, 1, (16, 256, 4)) is None
    assert anchor_tokens_per_s("joint", "ratplus-1.5b", None, 2, 4, d64) is None     # accumulation
    assert anchor_tokens_per_s("dense", "ratplus-1.5b", None, 4, 1, d64) is None     # other micro-batch
    assert anchor_tokens_per_s("dense", "ratplus-1.5b", 4, 2, 1, d64) is None        # fewer layers
    assert anchor_tokens_per_s("dense", "ratplus-2.6b", None, 2, 1, d64) is None


def test_clocks_without_a_gpu_is_a_clear_error():
    proc = run_script("--preset", "ratplus-tiny", "--seq-len", "64", "--steps", "1", "--warmup", "0", "--clocks")
    assert proc.returncode != 0
    assert "--clocks samples a CUDA GPU" in proc.stderr
