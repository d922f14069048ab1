#!/usr/bin/env bash
# Multi-GPU checks on a 2-GPU host (issue 5/7): NCCL TP=2 and DP=2 against 1 GPU, throughput scaling of
# the 1.5B model, and an async checkpoint save + exact resume on GPU. Run from the repo root:
#   bash tools/gpu/two_gpu.sh            (outputs under ${OUT:-/tmp/two_gpu})
set -uo pipefail
source tools/gpu/setup_env.sh || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=${OUT:-/tmp/two_gpu}; mkdir -p "$R"
run() { local n=$1; shift; torchrun --standalone --nproc_per_node="$n" "$@"; }
filter() { grep -v "UserWarning\|warnings.warn\|^W11\|^\*\*\*\|OMP_NUM_THREADS" ; }

echo "== throughput: ratplus-1.5b, 1 GPU vs DP=2 vs TP=2+SP (micro-batch 2, T=4096) =="
python3 tools/bench/bench_training.py --modes dense,joint --steps 5 --warmup 2 2>&1 | filter | tail -3
run 2 tools/bench/bench_training.py --modes dense,joint --steps 5 --warmup 2 2>&1 | filter | tail -3
run 2 tools/bench/bench_training.py --tp 2 --sp --modes dense,joint --steps 5 --warmup 2 2>&1 | filter | tail -3

echo "== loss curves: ratplus-125m on the embedded corpus, 1 GPU vs TP=2 vs DP=2 (same seed and data) =="
COMMON=(recipes/tiny-cpu.yaml model.preset=ratplus-125m model.spec=local train.precision=bf16
        train.seq_len=1024 train.micro_batch_size=4 train.global_batch_size=8 train.max_steps=20
        train.lr=1.0e-3 data.default_dir=$R/data data.default_size_mb=8 data.default_vocab_size=8192
        parallel.distributed_optimizer=true parallel.overlap_grad_reduce=true logging.progress=false
        logging.tensorboard_dir= logging.eval_interval=10)
python3 -m megatron_ratplus.training.cli "${COMMON[@]}" checkpoint.save_dir=$R/ck1 checkpoint.save_interval=10 \
    checkpoint.async_save=true logging.metrics_jsonl=$R/gpu1.jsonl 2>&1 | filter | grep -E "step (1|10|20)/|saved|done|error|Error" 
run 2 -m megatron_ratplus.training.cli "${COMMON[@]}" parallel.tensor_parallel=2 parallel.sequence_parallel=true \
    checkpoint.save_dir= logging.metrics_jsonl=$R/tp2.jsonl 2>&1 | filter | grep -E "step (1|10|20)/|done|error|Error"
run 2 -m megatron_ratplus.training.cli "${COMMON[@]}" checkpoint.save_dir= logging.metrics_jsonl=$R/dp2.jsonl \
    2>&1 | filter | grep -E "step (1|10|20)/|done|error|Error"

echo "== resume from the async step-10 checkpoint (rewritten as latest) at TP=2 =="
mkdir -p $R/ck2 && cp -r $R/ck1/iter_0000010 $R/ck2/ && echo 10 > $R/ck2/latest_checkpointed_iteration.txt
run 2 -m megatron_ratplus.training.cli "${COMMON[@]}" parallel.tensor_parallel=2 checkpoint.save_dir=$R/ck2 \
    checkpoint.load=latest logging.metrics_jsonl=$R/resume_tp2.jsonl 2>&1 | filter | grep -E "resumed|step (11|20)/|done|error|Error"

python3 - "$R" <<'PY'
import json, sys
r = sys.argv[1]
def losses(name):
    rows = [json.loads(l) for l in open(f"{r}/{name}.jsonl")]
    return {x["step"]: x for x in rows if "losses" in x}
base = losses("gpu1")
for name in ("tp2", "dp2", "resume_tp2"):
    try:
        other = losses(name)
    except FileNotFoundError:
        print(name, "missing"); continue
    common = sorted(set(base) & set(other))
    diffs = [max(abs(base[s]["losses"][m] - other[s]["losses"][m]) for m in base[s]["losses"]) for s in common]
    print(f"{name}: steps {common[0]}-{common[-1]}, max |loss diff| vs 1 GPU {max(diffs):.4f}, "
          f"step {common[-1]} losses {other[common[-1]]['losses']} vs {base[common[-1]]['losses']}")
PY
