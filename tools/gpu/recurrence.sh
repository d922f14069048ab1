#!/usr/bin/env bash
# GPU checks and benchmark of the fused RAT+ recurrence (issue 3). Run from the repository root on
# a CUDA machine; results go to $OUT (default /tmp/recurrence_out).
#   bash tools/gpu/recurrence.sh            # GPU tests + full benchmark (reference + fla columns)
#   BENCH_ARGS=--quick bash tools/gpu/recurrence.sh     (also --sweep, --no-ref, --ref-anchor-only,
#   --depths, --no-fla; TEST_ARGS='-m gpu', SKIP_TESTS=1, SKIP_BENCH=1)
# fla comparison: put the fla-core wheel in .whl_fla/ (pip download --no-deps fla-core==0.6.0);
# einops must already be installed.
set -o pipefail
OUT=${OUT:-/tmp/recurrence_out}
mkdir -p "$OUT"
if ls .whl_fla/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_fla/fla_core-*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/kernels:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"

# whole test file: on a GPU the CPU-sized cases run the compiled, autotuned kernels too
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout -s KILL "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_recurrence.py \
    ${TEST_ARGS:-} 2>&1 | tee "$OUT/recurrence_tests.log"
  echo "tests exit: $?" | tee -a "$OUT/recurrence_tests.log"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  timeout -s KILL "${BENCH_TIMEOUT:-420}" python3 tools/bench/bench_recurrence.py ${BENCH_ARGS:-} \
    2>&1 | tee "$OUT/recurrence_bench.log"
  echo "bench exit: $?" | tee -a "$OUT/recurrence_bench.log"
fi
