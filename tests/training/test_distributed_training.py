"""The pretraining CLI under torchrun (2 processes, gloo, CPU mode) on real text: TP=2, PP=2, DP=2."""
import json
import re

import pytest

from ..conftest import tiny_cli_overrides
from ..torchrun import torchrun

pytestmark = pytest.mark.slow


def read_metrics(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "losses" in r]


def run_cli(tmp_path, data_dir, *extra, nproc=2, steps=20):
    out = tmp_path / "run"
    out.mkdir()
    proc = torchrun("megatron_ratplus.training.cli", *tiny_cli_overrides(data_dir, out, steps), *extra,
                    nproc=nproc, module=True, timeout=600)
    done = re.search(r"done: (\d+) steps, ([\d,]+) tokens, (\d+) optimizer updates", proc.stdout)
    assert done, proc.stdout[-3000:]
    return read_metrics(out), int(done.group(1)), int(done.group(3)), proc.stdout


@pytest.mark.parametrize("layout", [["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
                                    ["parallel.pipeline_parallel=2"],
                                    []],
                         ids=["tp2-sp", "pp2", "dp2"])
def test_joint_training_loss_falls(tmp_path, tiny_dataset, layout):
    rows, steps, updates, stdout = run_cli(tmp_path, tiny_dataset, *layout)
    assert steps == 20 and len(rows) == 20
    assert updates == 40, "joint training takes two optimizer updates per batch"
    first, last = rows[0]["losses"], rows[-1]["losses"]
    assert set(first) == {"sparse", "dense"}
    assert last["dense"] < first["dense"] - 0.5 and last["sparse"] < first["sparse"] - 0.5, (first, last)
    dp = 2 if not layout else 1
    assert f"DP={dp}" in stdout


def test_tp2_and_dp2_match_one_process_step_by_step(tmp_path, tiny_dataset):
    """Same seed and full weights drawn on CPU (parallel.cpu_initialization): TP=2 and DP=2 follow
    the one-process run in losses, gradient norms and validation losses. The validation set is
    logging.eval_iters global batches, so it is the same samples at DP=1 (2 micro-batches per rank)
    and DP=2 (1 per rank)."""
    same = ["parallel.cpu_initialization=true", "logging.eval_interval=5", "logging.eval_iters=1"]
    runs = {}
    for name, nproc, layout in (("one", 1, []), ("tp2", 2, ["parallel.tensor_parallel=2"]), ("dp2", 2, [])):
        (tmp_path / name).mkdir()
        runs[name], *_ = run_cli(tmp_path / name, tiny_dataset, *same, *layout, nproc=nproc, steps=5)
    evals = {name: [json.loads(line) for line in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
                    if "val_losses" in line] for name in runs}
    assert len(evals["one"]) == 1

    def close(a, b):
        return abs(a - b) <= 1e-5 * max(1.0, abs(a))

    for name in ("tp2", "dp2"):
        assert len(runs[name]) == 5
        for a, b in zip(runs["one"], runs[name]):
            for mode in ("sparse", "dense"):
                assert close(a["losses"][mode], b["losses"][mode]), (name, a, b)
            assert close(a["grad_norm"], b["grad_norm"]), (name, a, b)
        for mode in ("sparse", "dense"):
            assert close(evals["one"][0]["val_losses"][mode], evals[name][0]["val_losses"][mode]), (name, evals)


def test_launcher_two_simulated_nodes_trains_end_to_end(tmp_path, tiny_dataset):
    """recipes/launch/torchrun.sh on two 'nodes' (localhost, one process each): a DP=2 run of the
    real trainer meets through the c10d rendezvous and finishes with falling losses. Both "nodes" share
    this host, hence one host's worth of data readers (streaming's shared memory is per host), which
    the trainer reads from the readers' host names."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from ..torchrun import REPO, free_port
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               CPU_PROCS_PER_NODE="1", TORCHRUN=str(Path(sys.executable).with_name("torchrun")),
               PYTHONWARNINGS="ignore")
    args = tiny_cli_overrides(tiny_dataset, out, steps=10)
    procs = [subprocess.Popen(["bash", "recipes/launch/torchrun.sh", *args], cwd=REPO,
                              env=dict(env, NODE_RANK=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "DP=2 (world 2" in outs[0] and "done: 10 steps" in outs[0]
    rows = read_metrics(out)
    assert len(rows) == 10 and rows[-1]["losses"]["dense"] < rows[0]["losses"]["dense"] - 0.3


def test_fused_weight_gradient_accumulation_under_tp2_sp_matches_unfused(tmp_path, tiny_dataset):
    """train.gradient_accumulation_fusion=true (the torch GEMM into main_grad, on by default on GPU)
    with TP=2 and sequence parallelism, where the weight gradient's input is the all-gathered sequence:
    the same loss curve as the unfused path."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    layout = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]
    plain, *_, plain_log = run_cli(tmp_path / "a", tiny_dataset, *layout, "train.gradient_accumulation_fusion=false",
                                   steps=5)
    fused, *_, fused_log = run_cli(tmp_path / "b", tiny_dataset, *layout, "train.gradient_accumulation_fusion=true",
                                   steps=5)
    assert "weight-gradient accumulation: unfused" in plain_log
    assert "weight-gradient accumulation: fused into the GEMM (megatron_ratplus.fused_wgrad (torch))" in fused_log
    assert len(plain) == len(fused) == 5
    for a, b in zip(plain, fused):
        for mode in ("sparse", "dense"):
            assert abs(a["losses"][mode] - b["losses"][mode]) < 1e-4, (a, b)


def test_a_save_sees_the_whole_update_with_the_overlapped_parameter_all_gather():
    """Distributed optimizer with parallel.overlap_param_gather=true, DP=2: after an update each replica's
    model weights hold only its own shard of it until the next forward gathers the rest. A checkpoint
    (written from the weights of data-parallel rank 0) saved at that point must still hold the whole
    update, as Megatron-LM forces the parameter all-gather before a save."""
    from pathlib import Path
    torchrun(Path(__file__).with_name("overlap_param_gather_worker.py"), nproc=2)
