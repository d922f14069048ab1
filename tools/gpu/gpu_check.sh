#!/usr/bin/env bash
# One-call GPU check: build/install, kernel tests, kernel benchmarks and the decode benchmark, as
# selected by STEPS (space-separated, run in the order given). Each step has its own time limit and
# writes its log to $OUT/<step>.log. Run from the repository root on the GPU host:
#   STEPS="rec_tests rec_bench da_tests da_bench decode" bash tools/gpu/gpu_check.sh
# Steps:
#   gpu_tests   every test marked gpu (kernels, Hugging Face model on CUDA) under ${GPU_TESTS:-tests}
#   rec_tests   pytest tests/kernels/test_recurrence.py (GPU tests run, poisoned outputs; REC_TEST_K:
#               a -k filter, REC_TEST_LIMIT: seconds)
#   rec_sweep   bench_recurrence.py --sweep $REC_SWEEP_ARGS (every block config, e.g. --sweep-designs
#               lookback,candidates --sweep-shapes 4x4096) and the A/B against REC_PREV if set
#   rec_ab      A/B of the anchor against REC_PREV (other fused.py files, space-separated, e.g.
#               git show <rev>:kernels/ratplus_kernels/recurrence/fused.py > .bench_prev/fused.py,
#               carried as an ignored path) and forced block pairs
#   rec_bench   bench_recurrence.py $REC_ARGS (the docs/benchmarks.md table)
#   rec_sol     A/B of the anchor against a copy of fused.py without look-back waits (diagnostic:
#               the time the tiles take when no program waits for its predecessors)
#   rec_sync    A/B of the anchor against diagnostic copies of fused.py without the look-back waits,
#               also without the publishes, also without the atomic tile claim (timing only)
#   rec_ncu     Nsight Compute sections of one forward + backward (tools/bench/profile_recurrence.py)
#   rec_spread  bench_recurrence.py --spread --sweep-only (per-call spread of the anchor's backward)
#   da_tests    pytest -m gpu tests/kernels/test_dilated_attention.py (DA_TEST_K: a -k filter)
#   da_bench    bench_dilated_attention.py $DA_ARGS
#   da_ncu      Nsight Compute sections of one forward + backward (tools/bench/profile_dilated.py
#               $DA_NCU_ARGS, e.g. --forward single_pass; DA_NCU_FILTER: ncu options, e.g. -k regex:w0)
#   da_sweep    bench_dilated_attention.py --sweep --no-main --no-decode (every launch configuration,
#               the single-pass W = 0 backward included) and $DA_SWEEP_ARGS (default --profile:
#               per-kernel times; e.g. --sweep-shapes 1x16384,1x65536 --sweep-kinds fwd,far for long
#               sequences)
#   layer_bench bench_layer.py $LAYER_ARGS (one RAT+ layer through Megatron's TransformerLayer against
#               the DESIGN.md layer anchors; e.g. LAYER_ARGS="--with-ffn --profile")
#   train_graph the CUDA-graph training check: probe_cuda_graph.py (which part of a small model's step
#               cannot be captured, host syncs inside it) and pytest tests/training/test_cuda_graph.py
#   train_bench bench_training.py on the 1.5B preset, eager then CUDA graphs ($TRAIN_ARGS, default
#               --modes dense,sparse,joint --steps 8 --warmup 3)
#   train_ab    bench_training.py ($TRAIN_ARGS, default dense,joint with CUDA graphs) four times, alternating this
#               tree and the baseline tree TRAIN_BASE (carried, ignored: git archive <rev> megatron_ratplus kernels |
#               tar -x -C .bench_base); each log starts with the package paths it imported
#   layer_ab    the same A/B of bench_layer.py $LAYER_ARGS
#   train_real  the training CLI itself (recipes/ratplus-1.5b-100bt.yaml: data loader, logging, CUDA graphs) for
#               40 joint steps of 2 x 4096 tokens on a carried dataset, then bench_training.py with the same
#               options for comparison. REAL_DATA names the dataset (default data_cache/gpu32k; carry it), made
#               here with: ratplus-data default-corpus -o data_cache/gpu32k --seq-len 4096 --vocab-size 32000
#               --size-mb 8 (the 1.5B preset's vocabulary, ~230 steps of data)
#   targets     every DESIGN.md §4 target of the table atop docs/benchmarks.md, in one call (about 2 minutes):
#               the recurrence and dilated-attention anchors, the layer benchmark, and the 1.5B training step
#               (dense, sparse, joint; one micro-batch per update; CUDA graphs; GPU clocks sampled)
#   optimizer   the fused AdamW + bf16 weight write: its GPU tests (kernel against torch's fused AdamW; Megatron's
#               distributed optimizer with and without it) and bench_optimizer.py (the 1.5B model's tensors)
#   rmsnorm     the Triton RMSNorm: its GPU test (the 1.5B shape against the reference and torch's rms_norm) and
#               bench_rmsnorm.py (forward and forward + backward against torch's CUDA rms_norm)
#   resources   tools/bench/kernel_resources.py --sweep (registers / spills with the host's Triton)
#   decode      bench_decode.py on CUDA, bf16, real prefill, $DECODE_ARGS
#   decode16    the same with 16 sequences per step
#   decode_profile  torch.profiler tables of a few decoding steps (tiny, 4K, dense and D16/W256/P4)
# Wheels: .whl (bash ../shared/gpu/prepare_wheels.sh .whl transformers==... for decode) and
# optionally .whl_fla (fla-core, einops) for the fla column of rec_bench.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
source tools/gpu/setup_env.sh || exit 1
if ls .whl_fla/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site_fla .whl_fla/*.whl \
    && export PYTHONPATH=$PYTHONPATH:$PWD/.site_fla
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S))"
  timeout -s KILL "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc"
  grep -v "UserWarning\|warnings.warn" "$OUT/$name.log" | tail -n "${TAIL:-40}"
}

ab() {  # ab NAME COMMAND...: COMMAND four times, alternating this tree and the baseline tree TRAIN_BASE
  local name=$1; shift
  [ -d "${TRAIN_BASE:-}/megatron_ratplus" ] || { echo "$name: TRAIN_BASE must name a baseline tree"; exit 2; }
  local run pp n
  for run in new base new base; do
    pp=$PYTHONPATH
    [ "$run" = base ] && pp=$PWD/$TRAIN_BASE/kernels:$PWD/$TRAIN_BASE:$PYTHONPATH
    n=$(ls "$OUT"/"$name"_"$run"_*.log 2>/dev/null | wc -l)
    TAIL=${TAIL:-9} step "${name}_${run}_$n" 300 env PYTHONPATH="$pp" bash -c "python3 -P -c 'import \
      megatron_ratplus, ratplus_kernels; print(megatron_ratplus.__file__, ratplus_kernels.__file__)' && $(printf '%q ' "$@")"
  done
}

# Diagnostic copies of the recurrence kernels (timing only: wrong results) for rec_sol / rec_sync.
REC_FUSED=kernels/ratplus_kernels/recurrence/fused.py
NO_LOOKBACK='s/^    if c != stop:$/    if c == -12345:  # diagnostic copy: no look-back/'
diag_copy() {  # diag_copy SRC DEST MARKER SED_ARGS...: sed SRC into DEST, which must then contain MARKER
  local src=$1 dest=$2 marker=$3; shift 3
  mkdir -p "$(dirname "$dest")"
  sed "$@" "$src" > "$dest"
  grep -q "$marker" "$dest" || { echo "diagnostic copy $dest: sed matched nothing"; exit 2; }
}

# Nsight Compute sections of rec_ncu / da_ncu (one forward + backward inside the profiler range).
NCU_SECTIONS="--profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats
  --section WarpStateStats --section MemoryWorkloadAnalysis"

for s in ${STEPS:-rec_tests rec_bench da_tests decode}; do
  case "$s" in
    rec_tests) step rec_tests "${REC_TEST_LIMIT:-480}" python3 -m pytest -q -p no:cacheprovider \
                 tests/kernels/test_recurrence.py ${REC_TEST_K:+-k "$REC_TEST_K"} ;;
    rec_sweep) step rec_sweep "${REC_SWEEP_LIMIT:-420}" python3 tools/bench/bench_recurrence.py --no-fla --sweep \
                 --sweep-only ${REC_SWEEP_ARGS:-} \
                 $(for p in ${REC_PREV:-}; do echo --compare "$p"; done) ;;
    rec_ab)    step rec_ab 300 python3 tools/bench/bench_recurrence.py --no-fla --sweep-only \
                 $(for p in ${REC_PREV:?set REC_PREV to other fused.py files}; do echo --compare "$p"; done) ;;
    # without .site: fla-core needs the host's (newer) transformers, not the carried one
    rec_bench) step rec_bench 420 env PYTHONPATH="$PWD/.site_fla:$PWD/kernels:$PWD" \
                 python3 tools/bench/bench_recurrence.py ${REC_ARGS:-} ;;
    rec_sol)   # speed of light of the tile structure: a copy of fused.py whose look-back never waits
               # (wrong carries, timing only), A/B against the real kernels (and REC_PREV if set)
               diag_copy "$REC_FUSED" .bench_prev/fused_no_lookback.py "c == -12345" "$NO_LOOKBACK"
               step rec_sol 300 python3 tools/bench/bench_recurrence.py --no-fla --sweep-only \
                 --compare .bench_prev/fused_no_lookback.py $(for p in ${REC_PREV:-}; do echo --compare "$p"; done) ;;
    rec_sync)  # where the tiles' time goes: A/B of copies of fused.py without the look-back waits,
               # then also without the publishes (CTA barrier + release atomic), then also without
               # the atomic tile claim (program id instead): wrong carries, timing only
               diag_copy "$REC_FUSED" .bench_prev/fused_nowait.py "c == -12345" "$NO_LOOKBACK"
               diag_copy .bench_prev/fused_nowait.py .bench_prev/fused_nopublish.py "no publish" \
                 -e 's/^    tl.debug_barrier()$/    pass  # diagnostic copy: no publish/' \
                 -e 's/^    tl.atomic_xchg(flag_ptr, state, sem="release")$/    pass/'
               diag_copy .bench_prev/fused_nopublish.py .bench_prev/fused_noclaim.py "diagnostic copy$" \
                 's/^    vid = tl.atomic_add(flag_ptr, 1)$/    vid = tl.program_id(0)  # diagnostic copy/'
               step rec_sync 300 python3 tools/bench/bench_recurrence.py --no-fla --sweep-only --no-pairs \
                 --rounds 3 --compare .bench_prev/fused_nowait.py --compare .bench_prev/fused_nopublish.py \
                 --compare .bench_prev/fused_noclaim.py ;;
    rec_ncu)   TAIL=${TAIL:-400} step rec_ncu 300 ncu $NCU_SECTIONS \
                 python3 tools/bench/profile_recurrence.py ${REC_NCU_ARGS:-} ;;
    da_ncu)    TAIL=${TAIL:-400} step da_ncu 300 ncu $NCU_SECTIONS ${DA_NCU_FILTER:-} \
                 python3 tools/bench/profile_dilated.py ${DA_NCU_ARGS:-} ;;
    rec_spread) step rec_spread 240 python3 tools/bench/bench_recurrence.py --no-fla --spread --sweep-only ;;
    gpu_tests) step gpu_tests 560 python3 -m pytest -q -p no:cacheprovider -m gpu ${GPU_TESTS:-tests} ;;
    da_tests)  step da_tests 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_dilated_attention.py \
                 ${DA_TEST_K:+-k "$DA_TEST_K"} ;;
    da_bench)  step da_bench 420 python3 tools/bench/bench_dilated_attention.py ${DA_ARGS:-} ;;
    da_sweep)  TAIL=200 step da_sweep 540 python3 tools/bench/bench_dilated_attention.py --sweep --no-main \
                 --no-decode ${DA_SWEEP_ARGS---profile} ;;
    layer_bench) TAIL=${TAIL:-120} step layer_bench 420 python3 tools/bench/bench_layer.py ${LAYER_ARGS:-} ;;
    train_graph) TAIL=${TAIL:-80} step train_graph 240 bash -c "python3 tools/bench/probe_cuda_graph.py && \
                 python3 -m pytest -q -p no:cacheprovider -m gpu tests/training/test_cuda_graph.py" ;;
    train_bench) for g in false true; do
                   TAIL=${TAIL:-8} step "train_bench_graph_$g" 300 python3 tools/bench/bench_training.py --preset ratplus-1.5b \
                     --micro-batch 2 --seq-len 4096 ${TRAIN_ARGS:---modes dense,sparse,joint --steps 8 --warmup 3} \
                     --override "train.cuda_graph=$g"
                 done ;;
    train_ab) ab train_ab python3 tools/bench/bench_training.py --preset ratplus-1.5b --micro-batch 2 --seq-len 4096 \
                ${TRAIN_ARGS:---modes dense,joint --steps 6 --warmup 3 --override train.cuda_graph=true} ;;
    layer_ab) ab layer_ab python3 tools/bench/bench_layer.py ${LAYER_ARGS:-} ;;
    train_real) data=${REAL_DATA:-data_cache/gpu32k}
               [ -f "$data/manifest.json" ] || { echo "train_real: no dataset at $data (see the step's comment)"; exit 2; }
               TAIL=${TAIL:-12} step train_real 420 bash -c "python3 -m megatron_ratplus.training.cli \
                 recipes/ratplus-1.5b-100bt.yaml 'data.streams=[{local: $PWD/$data}]' train.global_batch_size=2 \
                 train.max_steps=40 train.cuda_graph=true checkpoint.save_dir=null checkpoint.load=null \
                 logging.log_interval=5 logging.eval_interval=0 logging.progress=false logging.tensorboard_dir=null \
                 && python3 tools/bench/bench_training.py --preset ratplus-1.5b --micro-batch 2 --seq-len 4096 \
                 --modes joint --steps 6 --warmup 3 --override train.cuda_graph=true \
                 --override parallel.distributed_optimizer=true --override parallel.overlap_grad_reduce=true" ;;
    targets)   step targets_kernels 200 bash -c "python3 tools/bench/bench_recurrence.py --quick --no-ref --no-fla && \
                 python3 tools/bench/bench_dilated_attention.py --shapes 4x4096 --no-flex --no-decode"
               TAIL=${TAIL:-10} step targets_layer 150 python3 tools/bench/bench_layer.py
               TAIL=${TAIL:-10} step targets_training 240 python3 tools/bench/bench_training.py --preset ratplus-1.5b \
                 --micro-batch 2 --seq-len 4096 --modes dense,sparse,joint --steps 6 --warmup 3 --clocks \
                 --override train.cuda_graph=true ;;
    rmsnorm)   step rmsnorm 240 bash -c "python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_rmsnorm.py \
                 && python3 tools/bench/bench_rmsnorm.py" ;;
    optimizer) step optimizer 300 bash -c "python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_optimizer.py \
                 tests/training/test_fused_optimizer_update.py && python3 tools/bench/bench_optimizer.py" ;;
    resources) TAIL=120 step resources 300 python3 tools/bench/kernel_resources.py --sweep ;;
    decode)    step decode 540 python3 tools/bench/bench_decode.py --device cuda --dtype bfloat16 --fill prefill \
                 --steps 32 --warmup 4 ${DECODE_ARGS:-} ;;
    decode16)  step decode16 540 python3 tools/bench/bench_decode.py --device cuda --dtype bfloat16 --fill prefill \
                 --steps 16 --warmup 3 --batch 16 ${DECODE_ARGS:-} ;;
    decode_profile) step decode_profile 300 python3 tools/bench/bench_decode.py --device cuda --dtype bfloat16 \
                 --fill prefill --profile --models tiny --contexts 4096 --settings dense,D16/W256/P4 ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
