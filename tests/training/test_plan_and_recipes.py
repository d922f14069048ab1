"""Recipes, the --dry-run plan (layout, budget, FLOPs, memory, time) and the launch scripts (CPU)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ratplus.model.config import pad_vocab_size
from megatron_ratplus.training.config import ConfigError, load_config
from megatron_ratplus.training.plan import GIB, format_plan, make_plan

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
LAUNCH = RECIPES / "launch"
RECIPE_NAMES = ["ratplus-1.5b-100bt", "ratplus-2.6b-200bt", "attention-1.5b-100bt",
                "adapt-d16-w256-p4", "adapt-d64", "tiny-cpu"]


def recipe(name: str, *overrides: str):
    return load_config(str(RECIPES / f"{name}.yaml"), list(overrides))


# ------------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------------
def test_recipe_set_is_complete():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(RECIPE_NAMES)


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipe_loads_and_validates(name):
    cfg = recipe(name)
    cfg.validate()
    args = cfg.model.model_args(seq_len=cfg.train.seq_len)
    assert args.max_seq_len >= cfg.train.seq_len
    assert cfg.total_steps() >= 1


PAPER = {  # DESIGN.md §1 presets
    "ratplus-1.5b-100bt": dict(preset="ratplus-1.5b", gbs=512, lr=8e-4, tokens=100e9, joint=True),
    "ratplus-2.6b-200bt": dict(preset="ratplus-2.6b", gbs=768, lr=7e-4, tokens=200e9, joint=True),
    "attention-1.5b-100bt": dict(preset="attention-1.5b", gbs=512, lr=8e-4, tokens=100e9, joint=False),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_pretraining_recipes_follow_the_paper(name):
    want = PAPER[name]
    cfg = recipe(name)
    t = cfg.train
    assert cfg.model.preset == want["preset"]
    assert (t.seq_len, t.global_batch_size, t.lr, t.max_tokens) == (4096, want["gbs"], want["lr"],
                                                                   int(want["tokens"]))
    assert (t.min_lr, t.warmup_fraction, t.lr_decay_style) == (1e-6, 0.05, "cosine")
    assert (t.weight_decay, t.adam_beta1, t.adam_beta2, t.clip_grad) == (0.1, 0.9, 0.95, 1.0)
    assert t.precision == "bf16" and t.joint is want["joint"]
    args = cfg.model.model_args(seq_len=t.seq_len)
    assert args.recurrence is (not name.startswith("attention"))
    assert [(p.dilation, p.window, p.initial) for p in set(args.patterns())] == [(64, 0, 0)]
    assert cfg.data.streams == [{"local": "/data/fineweb-edu-llama2/mds", "remote": None}]
    assert not cfg.data.default_corpus
    assert cfg.checkpoint.save_dir and cfg.checkpoint.load == "latest"
    if not t.joint:
        assert t.mode == "dense"


@pytest.mark.parametrize("name,pattern", [("adapt-d16-w256-p4", (16, 256, 4)), ("adapt-d64", (64, 0, 0))])
def test_adaptation_recipes(name, pattern):
    cfg = recipe(name)
    t = cfg.train
    assert not t.joint and t.mode == "sparse"
    assert (t.lr, t.min_lr, t.warmup_fraction, t.max_tokens) == (8e-5, 1e-6, 0.0, 10**9)
    args = cfg.model.model_args(seq_len=t.seq_len)
    assert {(p.dilation, p.window, p.initial) for p in args.patterns()} == {pattern}
    assert cfg.checkpoint.init_from and cfg.checkpoint.load == "latest"   # resumes itself after preemption
    # the placeholder is meant to be overridden on the command line
    cfg = recipe(name, "checkpoint.init_from=/ckpt/ratplus-1.5b")
    assert cfg.checkpoint.init_from == "/ckpt/ratplus-1.5b"
    assert cfg.total_steps() == math.ceil(10**9 / (512 * 4096)) == 477


def test_tiny_cpu_recipe():
    cfg = recipe("tiny-cpu")
    t, p = cfg.train, cfg.parallel
    assert cfg.model.preset == "tiny" and t.precision == "fp32" and t.joint
    assert (t.seq_len, t.micro_batch_size, t.global_batch_size, t.lr, t.warmup_fraction) == \
        (256, 4, 8, 3e-3, 0.1)
    assert 50 <= t.max_steps <= 150
    assert cfg.data.default_corpus and not cfg.data.streams
    assert cfg.checkpoint.save_dir == "runs/tiny-cpu/checkpoints" and cfg.checkpoint.save_interval == 50
    assert cfg.logging.tensorboard_dir == "runs/tiny-cpu/tb"
    assert (p.tensor_parallel, p.pipeline_parallel, p.distributed_optimizer) == (1, 1, False)
    # the 2-process CI runs: TP=2, PP=2 and DP=2 are all valid layouts of this recipe
    assert recipe("tiny-cpu").layout_for(2) == (2, 1)
    assert recipe("tiny-cpu", "parallel.tensor_parallel=2").layout_for(2) == (1, 2)
    assert recipe("tiny-cpu", "parallel.pipeline_parallel=2").layout_for(2) == (1, 2)


# ------------------------------------------------------------------------------------------------
# plans of the paper recipes
# ------------------------------------------------------------------------------------------------
EXPECTED = {  # (recipe, world) -> (parameters, grad-accumulation steps)
    ("ratplus-1.5b-100bt", 64): (1_540_458_496, 4),
    ("ratplus-1.5b-100bt", 128): (1_540_458_496, 2),
    ("ratplus-2.6b-200bt", 64): (2_732_997_120, 6),
    ("ratplus-2.6b-200bt", 128): (2_732_997_120, 3),
}


@pytest.mark.parametrize("name,world", sorted(EXPECTED))
def test_dry_run_plan_is_sane(name, world):
    cfg = recipe(name)
    plan = make_plan(cfg, world)
    params, accum = EXPECTED[(name, world)]
    t = cfg.train
    assert plan.num_parameters == params
    assert round(plan.num_parameters / 1e9, 2) == (1.54 if "1.5b" in name else 2.73)
    assert plan.world_size == world
    assert plan.data_parallel == world // (plan.tensor_parallel * plan.pipeline_parallel)
    assert plan.grad_accum_steps == accum == t.global_batch_size // (t.micro_batch_size * plan.data_parallel)
    assert plan.tokens_per_step == t.global_batch_size * t.seq_len
    assert plan.steps == math.ceil(t.max_tokens / (t.global_batch_size * t.seq_len))
    assert plan.steps == (47_684 if "1.5b" in name else 63_579)
    assert plan.total_tokens == plan.steps * plan.tokens_per_step >= t.max_tokens
    args = cfg.model.model_args(seq_len=t.seq_len)
    fpt = args.flops_per_token(t.seq_len, pad_vocab_size(args.vocab_size, plan.tensor_parallel))
    assert plan.passes_per_step == 2
    assert plan.flops_per_step == pytest.approx(fpt * plan.tokens_per_step * 2, rel=1e-12)
    assert plan.total_flops == pytest.approx(plan.flops_per_step * plan.steps, rel=1e-12)
    assert 0 < plan.memory_gib < 80
    text = format_plan(plan)
    for needle in (f"world {world}", f"DP {plan.data_parallel}", f"{accum} accumulation steps",
                   f"{plan.steps:,}", f"{params:,}", "2 passes", "total", "joint"):
        assert needle in text, needle


def test_joint_counts_two_passes_dense_counts_one():
    joint = make_plan(recipe("ratplus-1.5b-100bt"), 64)
    dense = make_plan(recipe("ratplus-1.5b-100bt", "train.joint=false"), 64)
    assert joint.flops_per_step == pytest.approx(2 * dense.flops_per_step)
    assert dense.passes_per_step == 1
    # the two passes run one after the other: the memory peak is that of one pass
    assert joint.memory.total == pytest.approx(dense.memory.total)
    assert "joint" in " ".join(joint.notes) and not dense.notes


def test_1p5b_layout_numbers():
    """The 1.5B recipe at TP=1 on 64 GPUs, every term computed by hand (DESIGN.md sizes)."""
    m = make_plan(recipe("ratplus-1.5b-100bt"), 64).memory
    n = 1_540_458_496
    assert m.stage == "only" and m.parameters == n
    assert m.weights == 2 * n and m.grads == 4 * n and m.optimizer == pytest.approx(12 * n / 64)
    tokens = 2 * 4096
    per_layer = tokens * (2 * 23 * 2048 + 4 * 16)   # 23d bf16 elements + fp32 LSE per head
    assert m.activations == pytest.approx(24 * per_layer)
    assert m.logits == pytest.approx(tokens * 32000 * 6 + tokens * 2 * 2 * 2048)
    assert m.total == pytest.approx(m.weights + m.grads + m.optimizer + m.activations + m.logits
                                    + 2 * GIB)


def test_per_gpu_parameter_shards():
    d, L, V = 2048, 24, 32000
    layer_sharded, layer_rep = 14 * d * d, 2 * d
    # TP=2: sharded matrices and embedding/head halve, norms stay whole
    p = make_plan(recipe("ratplus-1.5b-100bt", "parallel.tensor_parallel=2",
                         "parallel.sequence_parallel=true"), 64)
    assert p.params_per_gpu == L * (layer_sharded // 2 + layer_rep) + 2 * V * d // 2 + d
    # PP=2: embedding on the first stage, head + final norm on the last; the stages add up
    p = make_plan(recipe("ratplus-1.5b-100bt", "parallel.pipeline_parallel=2"), 64)
    assert p.params_first_stage == 12 * (layer_sharded + layer_rep) + V * d
    assert p.params_last_stage == 12 * (layer_sharded + layer_rep) + V * d + d
    assert p.params_first_stage + p.params_last_stage == p.num_parameters
    assert p.params_per_gpu == p.params_last_stage
    assert {m.stage for m in p.memory_by_stage} == {"first", "last"}


def test_memory_model_responds_to_layout():
    base = make_plan(recipe("ratplus-1.5b-100bt"), 64).memory
    sp = make_plan(recipe("ratplus-1.5b-100bt", "parallel.tensor_parallel=2",
                          "parallel.sequence_parallel=true"), 64).memory
    assert sp.activations == pytest.approx(base.activations / 2)
    nosp = make_plan(recipe("ratplus-1.5b-100bt", "parallel.tensor_parallel=2"), 64).memory
    assert sp.activations < nosp.activations < base.activations      # norms replicated without SP
    double = make_plan(recipe("ratplus-1.5b-100bt", "train.micro_batch_size=4"), 64).memory
    assert double.activations == pytest.approx(2 * base.activations)
    rc = make_plan(recipe("ratplus-1.5b-100bt", "train.recompute=full"), 64).memory
    assert rc.activations < base.activations / 10
    nodist = make_plan(recipe("ratplus-1.5b-100bt", "parallel.distributed_optimizer=false"), 64).memory
    assert nodist.optimizer == pytest.approx(64 * base.optimizer)
    # 1F1B: the first of PP=2 stages holds 2 micro-batches of half the layers
    pp = make_plan(recipe("ratplus-1.5b-100bt", "parallel.pipeline_parallel=2"), 64)
    first = next(m for m in pp.memory_by_stage if m.stage == "first")
    last = next(m for m in pp.memory_by_stage if m.stage == "last")
    assert first.microbatches_in_flight == 2 and last.microbatches_in_flight == 1
    assert first.activations == pytest.approx(base.activations)
    assert last.activations == pytest.approx(base.activations / 2)
    assert first.logits == 0 and last.logits == pytest.approx(base.logits)
    # interleaved (VPP=3): first stage keeps 2(PP-1) + (VPP-1)PP + 1 = 7 chunks of 4 layers
    vpp = make_plan(recipe("ratplus-1.5b-100bt", "parallel.pipeline_parallel=2",
                           "parallel.virtual_pipeline_parallel=3"), 64)
    first_v = next(m for m in vpp.memory_by_stage if m.stage == "first")
    assert first_v.microbatches_in_flight == pytest.approx(7 / 3)
    # the attention baseline saves 20d per token and layer instead of 23d (no g block, no k~, v~)
    att = make_plan(recipe("attention-1.5b-100bt"), 64).memory
    assert att.activations == pytest.approx(base.activations * (2 * 20 * 2048 + 64) / (2 * 23 * 2048 + 64))


def test_pipeline_warmup_and_bubble_follow_the_schedule_counts():
    """The module docstring's formulas in the corners the other tests do not reach: 1F1B with fewer
    micro-batches than stages keeps min(PP, accum) in flight on the first stage, and interleaving
    divides the pipeline bubble by VPP."""
    few = make_plan(recipe("ratplus-1.5b-100bt", "parallel.pipeline_parallel=4", "train.global_batch_size=64"), 64)
    assert few.grad_accum_steps == 2
    assert next(m for m in few.memory_by_stage if m.stage == "first").microbatches_in_flight == 2
    base = make_plan(recipe("ratplus-1.5b-100bt"), 64)
    vpp = make_plan(recipe("ratplus-1.5b-100bt", "parallel.pipeline_parallel=2",
                           "parallel.virtual_pipeline_parallel=3"), 64)
    assert vpp.grad_accum_steps == 8
    assert vpp.tokens_per_sec_per_gpu == pytest.approx(base.tokens_per_sec_per_gpu / (1 + 1 / (3 * 8)))


def test_memory_estimate_matches_the_measured_reference_peak():
    """DESIGN.md §4: 1.5B, B=2, T=4096, bf16, one H100, no TP/PP: 53 GB peak (reference code)."""
    plan = make_plan(recipe("ratplus-1.5b-100bt", "train.global_batch_size=2"), 1)
    assert plan.grad_accum_steps == 1 and plan.data_parallel == 1
    assert plan.memory.total == pytest.approx(53e9, rel=0.15)


def test_throughput_and_time():
    cfg = recipe("ratplus-1.5b-100bt")
    est = make_plan(cfg, 64)
    assert est.throughput_estimated and "estimate" in format_plan(est)
    # this stack's joint rate on one H100 (523.8 TFLOP/s of model FLOPs, two passes per token):
    # the measured 26.0K tokens/s for the same model and sequence length
    assert est.tokens_per_sec_per_gpu == pytest.approx(523.8e12 / (2 * 1.0056892416e10))
    assert est.tokens_per_sec_per_gpu == pytest.approx(26.04e3, rel=1e-3)
    assert "measured on 1 H100" in est.throughput_note and "UNRELIABLE" not in est.throughput_note
    dense = make_plan(recipe("attention-1.5b-100bt"), 64)               # dense rate, carried to its FLOPs
    assert dense.tokens_per_sec_per_gpu == pytest.approx(487.1e12 / dense.flops_per_token, rel=1e-6)
    assert dense.model_tflops_per_gpu == pytest.approx(487.1, rel=1e-6)
    big = make_plan(recipe("ratplus-2.6b-200bt"), 64)                   # 1.8x the measured model: usable
    assert "UNRELIABLE" not in big.throughput_note
    tiny = make_plan(recipe("tiny-cpu"), 1)
    assert "UNRELIABLE" in tiny.throughput_note
    given = make_plan(cfg, 64, tokens_per_sec_per_gpu=27e3, peak_tflops=989.0)
    assert not given.throughput_estimated
    assert given.step_time_s == pytest.approx(512 * 4096 / (27e3 * 64))
    assert given.total_time_s == pytest.approx(given.step_time_s * 47_684)
    assert given.mfu == pytest.approx(27e3 * given.flops_per_token * 2 / 989e12)
    # pipeline bubble slows the estimate: (PP-1)/accum with PP=2, accum=4
    pp = make_plan(recipe("ratplus-1.5b-100bt", "parallel.pipeline_parallel=2"), 64)
    assert pp.grad_accum_steps == 8
    assert pp.tokens_per_sec_per_gpu == pytest.approx(est.tokens_per_sec_per_gpu / (1 + 1 / 8))
    with pytest.raises(ConfigError, match="positive"):
        make_plan(cfg, 64, tokens_per_sec_per_gpu=0)


# ------------------------------------------------------------------------------------------------
# rejected layouts
# ------------------------------------------------------------------------------------------------
def test_world_not_divisible_by_model_parallel():
    with pytest.raises(ConfigError, match=r"world size 63 is not divisible by tensor_parallel × "
                                          r"pipeline_parallel = 2 × 1 = 2"):
        make_plan(recipe("ratplus-1.5b-100bt", "parallel.tensor_parallel=2",
                         "parallel.sequence_parallel=true"), 63)


def test_world_63_global_batch_not_divisible():
    with pytest.raises(ConfigError, match=r"global_batch_size=512 is not divisible by micro_batch_size "
                                          r"× data_parallel = 2 × 63 = 126"):
        make_plan(recipe("ratplus-1.5b-100bt"), 63)


def test_layers_not_divisible_by_pp():
    with pytest.raises(ConfigError, match=r"24 layers, not divisible by parallel.pipeline_parallel=5"):
        make_plan(recipe("ratplus-1.5b-100bt", "parallel.pipeline_parallel=5"), 80)
    with pytest.raises(ConfigError, match=r"28 layers, not divisible by parallel.pipeline_parallel=8"):
        make_plan(recipe("ratplus-2.6b-200bt", "parallel.pipeline_parallel=8"), 128)


def test_global_batch_not_divisible():
    with pytest.raises(ConfigError, match=r"global_batch_size=500 is not divisible by micro_batch_size "
                                          r"× data_parallel = 2 × 64 = 128"):
        make_plan(recipe("ratplus-1.5b-100bt", "train.global_batch_size=500"), 64)


def test_heads_not_divisible_by_tp_and_bad_world():
    with pytest.raises(ConfigError,
                       match=r"20 attention heads are not divisible by parallel.tensor_parallel=8"):
        make_plan(recipe("ratplus-2.6b-200bt", "parallel.tensor_parallel=8",
                         "parallel.sequence_parallel=true"), 128)
    with pytest.raises(ConfigError, match="world size must be a positive integer"):
        make_plan(recipe("ratplus-1.5b-100bt"), 0)


def test_memory_overflow_is_rejected_with_advice():
    cfg = recipe("ratplus-2.6b-200bt", "train.micro_batch_size=16")
    with pytest.raises(ConfigError) as err:
        make_plan(cfg, 16)                     # 768 = 16 × 16 × 3: the layout itself is valid
    msg = str(err.value)
    assert "exceeds the GPU's 80 GiB by" in msg and "TP=1" in msg and "micro_batch_size=16" in msg
    over = float(msg.split("by ")[1].split(" GiB")[0])
    total = float(msg.split("per GPU ")[1].split(" GiB")[0])
    assert over == pytest.approx(total - 80, abs=0.11) and over > 100
    assert "train.recompute=full" in msg and "train.micro_batch_size=" in msg
    assert "parallel.tensor_parallel=" in msg
    # every suggested change, applied alone, really fits
    suggestions = msg.split("would fit: ")[1].split("; ")
    assert len(suggestions) >= 3
    for s in suggestions:
        overrides = s.split(" (≈")[0].split()
        plan = make_plan(recipe("ratplus-2.6b-200bt", "train.micro_batch_size=16", *overrides), 16)
        assert plan.memory_gib <= 80, s


def test_memory_limit_follows_gpu_size():
    cfg = recipe("ratplus-1.5b-100bt")
    need = make_plan(cfg, 64).memory_gib
    make_plan(cfg, 64, gpu_memory_gib=need + 0.5)
    with pytest.raises(ConfigError, match=r"exceeds the GPU's 24 GiB"):
        make_plan(cfg, 64, gpu_memory_gib=24)


# ------------------------------------------------------------------------------------------------
# launch scripts
# ------------------------------------------------------------------------------------------------
SCRIPTS = [LAUNCH / "torchrun.sh", LAUNCH / "slurm.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_parses(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert script.stat().st_mode & stat.S_IXUSR
    assert script.read_text().startswith("#!/usr/bin/env bash\n")


def test_sbatch_header():
    text = (LAUNCH / "slurm.sbatch").read_text()
    for line in ("#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --nodes=", "#SBATCH --gpus-per-node=", "#SBATCH --time="):
        assert line in text, line
    assert "scontrol show hostnames" in text and "scontrol requeue" in text


@pytest.mark.parametrize("visible,expected", [("", 8), ("0,1", 2), ("3", 1), ("0,1,2,3,4,5,6,7,8,9", 8)])
def test_torchrun_launcher_counts_only_the_visible_gpus(tmp_path, visible, expected):
    """Processes per node: the GPUs nvidia-smi lists, at most those CUDA_VISIBLE_DEVICES names."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/usr/bin/env bash\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100 (UUID: x)\"; done\n")
    fake.chmod(0o755)
    script = f"source <(sed -n '/^count_gpus() {{/,/^}}/p' {LAUNCH / 'torchrun.sh'}); count_gpus"
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", CUDA_VISIBLE_DEVICES=visible))
    assert res.returncode == 0 and res.stdout.strip() == str(expected), res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_launch_scripts_shellcheck_clean():
    res = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = """
import json, os, signal, sys, time, pathlib
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, out = dist.get_rank(), pathlib.Path(os.environ["PROBE_OUT"])
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
(out / f"rank{rank}.json").write_text(json.dumps({
    "world": dist.get_world_size(), "sum": t.item(), "argv": sys.argv[1:],
    "cuda_max_conn": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")}))
if os.environ.get("PROBE_WAIT"):
    def on_signal(signum, frame):
        (out / f"signal{rank}").write_text(signal.Signals(signum).name)
        os._exit(0)
    signal.signal(signal.SIGUSR1, on_signal)
    (out / f"ready{rank}").write_text("1")
    time.sleep(120)
dist.destroy_process_group()
"""


def _probe_env(tmp_path: Path, **extra) -> dict:
    (tmp_path / "ratplus_probe.py").write_text(PROBE)
    env = dict(os.environ)
    for k in ("GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID",
              "CUDA_DEVICE_MAX_CONNECTIONS", "SLURM_JOB_ID"):
        env.pop(k, None)
    env.update(PYTHONPATH=f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}", PROBE_OUT=str(tmp_path),
               LAUNCH_MODULE="ratplus_probe", CPU_PROCS_PER_NODE="2",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_torchrun_launcher_two_simulated_nodes(tmp_path):
    """Two 'nodes' on localhost (2 CPU processes each) meet through the c10d rendezvous."""
    env = _probe_env(tmp_path, NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen(["bash", str(LAUNCH / "torchrun.sh"), "recipe.yaml", "train.lr=1"],
                              env=dict(env, NODE_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=150)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(r["world"] == 4 and r["sum"] == 10.0 for r in results)
    assert all(r["argv"] == ["recipe.yaml", "train.lr=1"] for r in results)
    assert all(r["cuda_max_conn"] == "1" for r in results)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sbatch_forwards_preemption_signal_and_requeues(tmp_path):
    """slurm.sbatch under stand-in srun/scontrol: SIGUSR1 to the batch shell reaches every trainer
    (through torchrun) and the job is requeued."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "${1:-}" == --* ]]; do shift; done\n'
                                'export SLURM_NODEID=0\nexec "$@"\n')
    (stubs / "scontrol").write_text('#!/usr/bin/env bash\nif [[ "$1" == show ]]; then echo 127.0.0.1; '
                                    'exit 0; fi\necho "$*" >> "$PROBE_OUT/scontrol.log"\n')
    for f in stubs.iterdir():
        f.chmod(0o755)
    env = _probe_env(tmp_path, PROBE_WAIT="1", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1]",
                     SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="2", SLURM_SUBMIT_DIR=str(ROOT),
                     MASTER_PORT=str(_free_port()))
    env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "recipes/tiny-cpu.yaml"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "trainers did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert [(tmp_path / f"signal{r}").read_text() for r in range(2)] == ["SIGUSR1", "SIGUSR1"], out
    assert (tmp_path / "scontrol.log").read_text().split("\n")[0] == "requeue 4242"
    assert json.loads((tmp_path / "rank0.json").read_text())["argv"] == ["recipes/tiny-cpu.yaml"]


# slurm.sbatch against stand-ins for srun and scontrol and a shell "trainer" as the launcher (no
# torch: each test runs in well under a second).
FAKE_SRUN = r"""#!/usr/bin/env bash
# srun inside an allocation: one task per node (SLURM_JOB_NUM_NODES), each in a process group of its
# own. As srun(1) does: SIGUSR1 is forwarded to every process of the tasks, a SIGTERM to srun ends
# them with SIGKILL ("srun: forcing job termination"), and the exit status is the highest task's.
printf '%s\n' "$@" > "$PROBE_OUT/srun.argv"
while [[ "${1:-}" == --* ]]; do shift; done
pids=()
for (( i = 0; i < SLURM_JOB_NUM_NODES; i++ )); do
    SLURM_NODEID=$i SLURM_PROCID=$i setsid "$@" &
    pids+=($!)
    echo "$!" >> "$PROBE_OUT/tasks.pids"
done
forward() { for p in "${pids[@]}"; do kill -s "$1" -- "-$p" 2>/dev/null || true; done; }
trap 'forward USR1' USR1
trap 'echo "srun: forcing job termination" >&2; forward KILL' TERM
rc=0
for p in "${pids[@]}"; do
    while true; do
        wait "$p" && r=0 || r=$?
        kill -0 "$p" 2>/dev/null || break
    done
    (( r > rc )) && rc=$r
done
exit "$rc"
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
# hostnames in two writes, as a long node list comes: a reader that stops after the first line
# leaves the second write a broken pipe
if [[ "$1" == show ]]; then echo gpu-a17; sleep 0.2; echo gpu-b02; exit 0; fi
echo "$*" >> "$PROBE_OUT/scontrol.log"
"""
FAKE_TRAINER = r"""#!/usr/bin/env bash
# The per-node launcher: records what it was given; FAKE_RC_<node> set: exits with it at once,
# else waits like a trainer and "checkpoints" and exits 0 on SIGUSR1 or SIGTERM.
out="$PROBE_OUT/node${NODE_RANK}"
for v in NODE_RANK MASTER_ADDR MASTER_PORT NNODES GPUS_PER_NODE RDZV_ID; do echo "$v=${!v}"; done > "$out.env"
printf '%s\n' "$@" > "$out.argv"
rc_var="FAKE_RC_${NODE_RANK}"
[[ -n "${!rc_var:-}" ]] && exit "${!rc_var}"
trap 'echo USR1 > "$out.signal"; exit 0' USR1
trap 'echo TERM > "$out.signal"; exit 0' TERM
touch "$out.ready"
while true; do sleep 0.05; done
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """A function giving the environment for slurm.sbatch under the stand-ins; afterwards, whatever
    of the stand-in's tasks is left (a failed test) is killed."""
    yield lambda **extra: _fake_slurm(tmp_path, **extra)
    pids = tmp_path / "tasks.pids"
    for pid in (pids.read_text().split() if pids.exists() else []):
        try:
            os.killpg(int(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _fake_slurm(tmp_path: Path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("trainer.sh", FAKE_TRAINER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_", "TORCH_ELASTIC"))
           and k not in ("GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID",
                         "RATPLUS_ROOT", "SRUN_EXTRA_ARGS")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PROBE_OUT=str(tmp_path), LAUNCHER=str(bin_dir / "trainer.sh"),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a17,gpu-b02", SLURM_JOB_NUM_NODES="2",
               SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(ROOT))
    env.update(extra)
    return env


SBATCH_ARGS = ["recipes/tiny-cpu.yaml", "model.dilation=[16,16,16,16]", "logging.wandb_project=a b"]


def test_sbatch_one_launcher_per_node_with_the_rendezvous(tmp_path, fake_slurm):
    res = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *SBATCH_ARGS],
                         env=fake_slurm(FAKE_RC_0="0", FAKE_RC_1="0"),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    srun = (tmp_path / "srun.argv").read_text().splitlines()
    assert srun[:4] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    for node in (0, 1):
        env = dict(line.split("=", 1) for line in (tmp_path / f"node{node}.env").read_text().splitlines())
        assert env == {"NODE_RANK": str(node), "MASTER_ADDR": "gpu-a17", "MASTER_PORT": str(20000 + 4242),
                       "NNODES": "2", "GPUS_PER_NODE": "8", "RDZV_ID": "4242"}
        assert (tmp_path / f"node{node}.argv").read_text().splitlines() == SBATCH_ARGS
    assert not (tmp_path / "scontrol.log").exists()          # finished: no requeue


def test_sbatch_exit_status_is_the_failed_nodes(tmp_path, fake_slurm):
    res = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *SBATCH_ARGS],
                         env=fake_slurm(FAKE_RC_0="0", FAKE_RC_1="3"), capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 3, res.stdout + res.stderr
    assert not (tmp_path / "scontrol.log").exists()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_sbatch_signal_reaches_the_trainers_as_sigusr1(tmp_path, fake_slurm, sig):
    """--signal=B:USR1 (or `scancel --batch --signal=TERM`) signals the batch shell only: the trainers
    must get SIGUSR1 through srun. srun answers a SIGTERM with SIGKILL of every task, so the trap
    must not pass SIGTERM on."""
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), *SBATCH_ARGS], env=fake_slurm(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while not all((tmp_path / f"node{n}.ready").exists() for n in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(sig)
    try:
        out = proc.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out
    assert "forcing job termination" not in out
    assert [(tmp_path / f"node{n}.signal").read_text().strip() for n in (0, 1)] == ["USR1", "USR1"], out
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4242"]


def test_sbatch_submitted_from_another_directory_fails_before_srun(tmp_path, fake_slurm):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = fake_slurm(SLURM_SUBMIT_DIR=str(elsewhere))
    env.pop("LAUNCHER")                                       # the default, relative to the submit dir
    # the batch shell starts in the job's working directory: the submit directory
    res = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *SBATCH_ARGS], env=env, capture_output=True,
                         text=True, timeout=30, cwd=elsewhere)
    assert res.returncode == 2 and "RATPLUS_ROOT" in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "srun.argv").exists()
    # RATPLUS_ROOT names the checkout; a missing recipe is caught the same way
    env.update(RATPLUS_ROOT=str(ROOT), LAUNCHER=str(tmp_path / "bin" / "trainer.sh"))
    res = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "recipes/nope.yaml"], env=env,
                         capture_output=True, text=True, timeout=30, cwd=elsewhere)
    assert res.returncode == 2 and "recipes/nope.yaml not found" in res.stderr, res.stderr
    assert not (tmp_path / "srun.argv").exists()


@pytest.mark.parametrize("procs", ["0", "abc", "2x"])
def test_torchrun_launcher_refuses_a_bad_cpu_process_count(tmp_path, procs):
    """Without GPUs the process count comes from CPU_PROCS_PER_NODE: a bad value is refused with
    the launcher's message, not a bash arithmetic error."""
    fake = tmp_path / "nvidia-smi"                             # a machine without GPUs
    fake.write_text("#!/usr/bin/env bash\nexit 0\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "CPU_PROCS_PER_NODE": procs, "TORCHRUN": "/bin/true"}
    res = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "r.yaml"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "GPUS_PER_NODE" in res.stderr, res.stderr
    assert "line " not in res.stderr, res.stderr              # bash's own error names a script line


def test_sbatch_runs_in_the_chdir_directory(tmp_path, fake_slurm):
    """sbatch --chdir=<checkout> from another directory: the job starts in the checkout (not in
    SLURM_SUBMIT_DIR), and the default launcher and the recipe are found there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = fake_slurm(SLURM_SUBMIT_DIR=str(elsewhere), FAKE_RC_0="0", FAKE_RC_1="0")
    env.pop("LAUNCHER")
    # an srun that only records its arguments (its tasks would run the real torchrun.sh)
    (tmp_path / "bin" / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$PROBE_OUT/srun.argv"\n')
    res = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *SBATCH_ARGS], env=env, capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 0 and "not found" not in res.stderr, res.stdout + res.stderr
    assert (tmp_path / "srun.argv").read_text().splitlines()[-len(SBATCH_ARGS) - 1:] == \
        ["recipes/launch/torchrun.sh", *SBATCH_ARGS]


def test_torchrun_launcher_arguments_environment_and_exit_status(tmp_path, fake_slurm):
    fake = tmp_path / "torchrun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$PROBE_OUT/torchrun.argv"\n'
                    'env > "$PROBE_OUT/torchrun.env"\nexit 5\n')
    fake.chmod(0o755)
    env = fake_slurm(TORCHRUN=str(fake), NNODES="8", NODE_RANK="7", MASTER_ADDR="gpu-a17",
                      MASTER_PORT="24242", GPUS_PER_NODE="8", RDZV_ID="4242", TORCHRUN_ARGS="--max-restarts 1")
    res = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "recipes/x.yaml", "logging.wandb_project=a b"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 5, res.stderr                   # torchrun's status is the script's
    assert (tmp_path / "torchrun.argv").read_text().splitlines() == [
        "--nnodes", "8", "--node_rank", "7", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "gpu-a17:24242", "--rdzv_id", "4242", "--max-restarts", "1",
        "-m", "megatron_ratplus.training.cli", "recipes/x.yaml", "logging.wandb_project=a b"]
    seen = dict(line.split("=", 1) for line in (tmp_path / "torchrun.env").read_text().splitlines() if "=" in line)
    assert seen["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and seen["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "240"
    assert {"SIGTERM", "SIGUSR1"} <= set(seen["PET_SIGNALS_TO_HANDLE"].split(","))
    res = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "r.yaml"], env=dict(env, NODE_RANK="8"),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "NODE_RANK" in res.stderr


# ------------------------------------------------------------------------------------------------
# recipe directories and the container image
# ------------------------------------------------------------------------------------------------
def test_recipes_write_to_directories_of_their_own():
    cfgs = {name: recipe(name) for name in RECIPE_NAMES}
    for attr in ("save_dir",):
        dirs = [getattr(c.checkpoint, attr) for c in cfgs.values()]
        assert len(set(dirs)) == len(dirs), dirs
    tbs = [c.logging.tensorboard_dir for c in cfgs.values()]
    assert len(set(tbs)) == len(tbs), tbs
    for name in ("adapt-d16-w256-p4", "adapt-d64"):          # weights from the pretraining run's save_dir
        assert cfgs[name].checkpoint.init_from == cfgs["ratplus-1.5b-100bt"].checkpoint.save_dir


@pytest.mark.parametrize("name", ["adapt-d16-w256-p4", "adapt-d64"])
def test_adaptation_recipe_2p6b_overrides_in_its_comment(name):
    """The comment's overrides for the 2.6B model give it the 2.6B weights and directories of its own
    (with the 1.5B adaptation's save_dir it would resume that run's checkpoints)."""
    lines = (RECIPES / f"{name}.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# For the 2.6B model add"))
    overrides = []
    for line in lines[start + 1:]:
        if not line.startswith("#"):
            break
        if line.startswith("#   "):                       # the indented lines hold the overrides
            overrides += line[1:].split()
    assert overrides
    cfg = recipe(name, *overrides)
    base = recipe(name)
    assert cfg.model.preset == "ratplus-2.6b" and cfg.train.global_batch_size == 768
    assert cfg.checkpoint.init_from == recipe("ratplus-2.6b-200bt").checkpoint.save_dir
    others = {recipe(n).checkpoint.save_dir for n in RECIPE_NAMES}
    assert cfg.checkpoint.save_dir not in others and cfg.checkpoint.save_dir != base.checkpoint.save_dir
    assert cfg.logging.tensorboard_dir not in {recipe(n).logging.tensorboard_dir for n in RECIPE_NAMES}
    assert cfg.layout_for(64) == (64, 6) and cfg.total_steps() == math.ceil(10**9 / (768 * 4096))


def test_dockerfile_installs_every_dependency():
    """The image installs the package with --no-deps: each pyproject dependency must be in the
    Dockerfile's pip install, except those the NGC base provides."""
    import re
    try:
        import tomllib
    except ImportError:                                       # Python 3.10
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() for d in deps}
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    install = re.search(r"RUN pip install \\\n((?:\s+\"[^\"]+\"(?: \\)?\n)+)", dockerfile)
    assert install, "no dependency install in docker/Dockerfile"
    installed = {re.split(r"[\s<>=!~;\[]", s, maxsplit=1)[0].lower() for s in re.findall(r'"([^"]+)"', install.group(1))}
    assert names - {"torch", "triton", "numpy"} <= installed, names - installed
