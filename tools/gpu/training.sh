#!/usr/bin/env bash
# Training throughput of the 1.5B preset on one GPU, dense and joint (issue 5). Run from the repo root
# on the GPU host: bash tools/gpu/training.sh [extra bench args]
set -uo pipefail
source tools/gpu/setup_env.sh || exit 1
python3 tools/bench/bench_training.py --preset ratplus-1.5b --micro-batch 2 --seq-len 4096 --steps 8 --warmup 3 "$@"
