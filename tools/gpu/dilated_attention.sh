#!/usr/bin/env bash
# GPU checks and benchmark of the fused RAT+ dilated attention (issue 4). Run from the repository
# root on a CUDA machine; logs go to $OUT (default /tmp/dilated_attention_out).
#   bash tools/gpu/dilated_attention.sh                  # GPU tests + whole test file + benchmark
#   TESTS=gpu BENCH_ARGS="--sweep --no-flex" bash tools/gpu/dilated_attention.sh
#   TESTS=none BENCH_ARGS="--shapes 4x4096" bash tools/gpu/dilated_attention.sh
#   TESTS=gpu TEST_K="realistic or decode" BENCH_ARGS="--sweep --no-main --no-decode" bash ...
set -o pipefail
OUT=${OUT:-/tmp/dilated_attention_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/kernels:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"

case "${TESTS:-all}" in
  gpu)  SEL=(-m gpu) ;;
  all)  SEL=() ;;
  none) SEL=(--collect-only) ;;
esac
if [ "${TESTS:-all}" != none ]; then
  # on a GPU the CPU-sized cases run the compiled kernels too (default GPU launch configurations)
  timeout -s KILL "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider "${SEL[@]}" ${TEST_K:+-k "$TEST_K"} \
    tests/kernels/test_dilated_attention.py 2>&1 | tee "$OUT/dilated_tests.log"
  echo "tests exit: $?" | tee -a "$OUT/dilated_tests.log"
fi

timeout -s KILL "${BENCH_TIMEOUT:-420}" python3 tools/bench/bench_dilated_attention.py ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT/dilated_bench.log"
echo "bench exit: $?" | tee -a "$OUT/dilated_bench.log"
