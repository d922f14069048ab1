"""tools/bench/bench_layer.py: the layer benchmark runs on CPU, counts the FLOPs the training
MFU formula counts, and rejects bad arguments with a usage error."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "bench"))

import bench_layer

from megatron_ratplus.model import RATPlusModelArgs


def run_script(*args):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'kernels'}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "bench_layer.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_cpu_smoke_run_prints_a_row_per_variant():
    proc = run_script("--batch", "1", "--seq-len", "64", "--hidden", "64", "--heads", "2", "--steps", "2",
                      "--warmup", "1", "--with-ffn", "--variants", "ratplus-d16w256p4,attention-dense")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| ratplus", "| attention"))]
    assert [r.split("|")[1].strip() for r in rows] == ["ratplus-d16w256p4", "attention-dense"]
    class Size:
        hidden, heads, seq_len = 64, 2, 64
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        fwd, fwd_bwd, block = float(cells[1]), float(cells[2]), float(cells[8])
        assert min(fwd, fwd_bwd, block) > 0           # CPU wall times: no ordering between them is reliable
        args = bench_layer.model_args(bench_layer.VARIANTS[cells[0]], Size)
        # the TFLOP/s columns are the model FLOPs over the printed times (3 significant digits)
        assert float(cells[3]) == pytest.approx(bench_layer.layer_flops(args, 1, 64) / fwd_bwd / 1e9, rel=2e-2)
        assert float(cells[9]) == pytest.approx(bench_layer.layer_flops(args, 1, 64, with_ffn=True) / block / 1e9,
                                                rel=2e-2)
        assert cells[5] == "—" and cells[7] == "—"      # not the anchor shape: no ratio, no target verdict
    assert "not this shape" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--variants", "ratplus-dense,typo"], "unknown variant"),
    (["--hidden", "100", "--heads", "16"], "not divisible"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_arguments_are_usage_errors(args, message):
    proc = run_script(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("recurrence", [True, False])
def test_dense_flops_agree_with_the_training_formula(recurrence):
    """Layer + FFN, dense, per token, against RATPlusModelArgs.flops_per_token of one layer without
    the LM head; the bench counts the exact causal pairs T(T+1)/2, the formula T^2/2."""
    B, T, d, H = 4, 4096, 2048, 16
    args = RATPlusModelArgs(num_layers=1, hidden_size=d, num_attention_heads=H, vocab_size=128,
                            recurrence=recurrence)
    per_token = args.flops_per_token(T) - 3 * 2 * d * args.vocab_size
    got = bench_layer.layer_flops(args, B, T, with_ffn=True) / (B * T)
    assert got == pytest.approx(per_token, rel=1e-3)


def test_sparse_flops_count_only_allowed_pairs():
    B, T, d, H = 2, 1024, 256, 2
    dense = RATPlusModelArgs(num_layers=1, hidden_size=d, num_attention_heads=H, vocab_size=128)
    sparse = RATPlusModelArgs(num_layers=1, hidden_size=d, num_attention_heads=H, vocab_size=128,
                              dilation=64, local_window=0, initial_tokens=0, attention_mode="sparse")
    pairs_dense, pairs_sparse = T * (T + 1) // 2, sum(1 + (t // 64) for t in range(T))
    assert (bench_layer.layer_flops(dense, B, T) - bench_layer.layer_flops(sparse, B, T)
            == pytest.approx(3 * 4 * d * B * (pairs_dense - pairs_sparse)))


def test_variants_map_to_their_architecture():
    class Size:
        hidden, heads, seq_len = 256, 2, 128
    args = bench_layer.model_args(bench_layer.VARIANTS["ratplus-d16w256p4"], Size)
    assert (args.recurrence, args.attention_mode, args.patterns()[0].window) == (True, "sparse", 256)
    assert bench_layer.model_args(bench_layer.VARIANTS["attention-dense"], Size).num_projection_blocks == 4
