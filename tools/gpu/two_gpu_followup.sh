#!/usr/bin/env bash
# Follow-up of two_gpu.sh: TP=2 vs 1 GPU with layout-invariant (CPU) initialisation, and the async
# checkpoint save at step 10 with its full log.
set -uo pipefail
source tools/gpu/setup_env.sh || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=${OUT:-/tmp/two_gpu}; mkdir -p "$R"
COMMON=(recipes/tiny-cpu.yaml model.preset=ratplus-125m model.spec=local train.precision=bf16
        train.seq_len=1024 train.micro_batch_size=4 train.global_batch_size=8 train.max_steps=12
        train.lr=1.0e-3 data.default_dir=$R/data data.default_size_mb=8 data.default_vocab_size=8192
        parallel.cpu_initialization=true logging.progress=false logging.tensorboard_dir= logging.eval_interval=)
python3 -m megatron_ratplus.training.cli "${COMMON[@]}" checkpoint.save_dir=$R/ck1 checkpoint.save_interval=10 \
    checkpoint.async_save=true logging.metrics_jsonl=$R/gpu1.jsonl > $R/gpu1.log 2>&1; echo "gpu1 rc=$?"
grep -v "UserWarning\|warnings.warn" $R/gpu1.log | grep -E "step (1|10|12)/|saved|done" ; grep -B2 -A12 "Traceback" $R/gpu1.log | head -40
torchrun --standalone --nproc_per_node=2 -m megatron_ratplus.training.cli "${COMMON[@]}" parallel.tensor_parallel=2 \
    parallel.sequence_parallel=true checkpoint.save_dir= logging.metrics_jsonl=$R/tp2.jsonl > $R/tp2.log 2>&1; echo "tp2 rc=$?"
python3 - "$R" <<'PY'
import json, sys
r = sys.argv[1]
rows = lambda n: {x["step"]: x["losses"] for x in map(json.loads, open(f"{r}/{n}.jsonl")) if "losses" in x}
a, b = rows("gpu1"), rows("tp2")
for s in sorted(set(a) & set(b)):
    print(s, {m: round(a[s][m], 4) for m in a[s]}, {m: round(b[s][m], 4) for m in b[s]})
PY
