#!/usr/bin/env bash
# Launch ratplus-pretrain on this node with torchrun; run it once per node.
#
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0 host> MASTER_PORT=29500 \
#       recipes/launch/torchrun.sh recipes/ratplus-1.5b-100bt.yaml [section.key=value ...]
#
# Environment (all optional):
#   NNODES              number of nodes (default 1)
#   NODE_RANK           this node's rank, 0..NNODES-1 (default 0; the c10d rendezvous may reorder)
#   MASTER_ADDR         host of the rendezvous endpoint, reachable from every node (default 127.0.0.1)
#   MASTER_PORT         its port (default 29500)
#   GPUS_PER_NODE       processes per node (default: the GPUs nvidia-smi lists, at most those in
#                       CUDA_VISIBLE_DEVICES; on a machine without GPUs, CPU_PROCS_PER_NODE)
#   CPU_PROCS_PER_NODE  processes per node without GPUs (default 1; CPU mode over gloo)
#   RDZV_ID             rendezvous id shared by the nodes of one job (default $SLURM_JOB_ID or "ratplus")
#   LAUNCH_MODULE       python module to run (default megatron_ratplus.training.cli)
#   TORCHRUN            the torchrun executable (default: torchrun)
#   TORCHRUN_ARGS       extra torchrun arguments, word-split (e.g. "--max-restarts 1")
# NCCL / CUDA variables below are defaults only: a value already in the environment wins.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-ratplus}}"
LAUNCH_MODULE="${LAUNCH_MODULE:-megatron_ratplus.training.cli}"
TORCHRUN="${TORCHRUN:-torchrun}"

count_gpus() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
    fi
    # CUDA_VISIBLE_DEVICES (set by a scheduler or the user) limits the GPUs this job may use.
    if (( ${n:-0} > 0 )) && [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local -a visible
        IFS=',' read -r -a visible <<< "${CUDA_VISIBLE_DEVICES}"
        (( ${#visible[@]} < n )) && n="${#visible[@]}"
    fi
    echo "${n:-0}"
}

if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    gpus="$(count_gpus)"
    if (( gpus > 0 )); then
        GPUS_PER_NODE="${gpus}"
    else
        GPUS_PER_NODE="${CPU_PROCS_PER_NODE:-1}"
        # CPU mode: share the cores between the ranks (torchrun would otherwise force 1 thread).
        if [[ "${GPUS_PER_NODE}" =~ ^[1-9][0-9]*$ ]]; then      # else refused below, naming it
            cores="$(nproc 2>/dev/null || echo 1)"
            threads=$(( cores / GPUS_PER_NODE ))
            export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
        fi
    fi
fi

for v in NNODES NODE_RANK MASTER_PORT GPUS_PER_NODE; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then
        echo "torchrun.sh: ${v} must be a non-negative integer, got '${!v}'" >&2
        exit 2
    fi
done
if (( NODE_RANK >= NNODES )) || (( GPUS_PER_NODE < 1 )); then
    echo "torchrun.sh: need 0 <= NODE_RANK < NNODES and GPUS_PER_NODE >= 1" \
         "(NODE_RANK=${NODE_RANK} NNODES=${NNODES} GPUS_PER_NODE=${GPUS_PER_NODE})" >&2
    exit 2
fi

# Megatron: with TP/SP communication overlap the kernels must be queued in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# Interfaces are site specific: export NCCL_SOCKET_IFNAME / NCCL_IB_HCA before calling if needed.
# Preemption: torchrun forwards these signals to the trainers, which finish the step, save and
# exit 0; it waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds before SIGKILL (older torchrun: 30 s).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}"

extra=()
if [[ -n "${TORCHRUN_ARGS:-}" ]]; then
    read -r -a extra <<< "${TORCHRUN_ARGS}"
fi

echo "torchrun.sh: node ${NODE_RANK}/${NNODES}, ${GPUS_PER_NODE} processes per node," \
     "rendezvous ${MASTER_ADDR}:${MASTER_PORT} (id ${RDZV_ID}), module ${LAUNCH_MODULE}" >&2

# exec: signals sent to this script (srun, Slurm, kill) reach torchrun itself.
exec "${TORCHRUN}" \
    --nnodes "${NNODES}" \
    --node_rank "${NODE_RANK}" \
    --nproc_per_node "${GPUS_PER_NODE}" \
    --rdzv_backend c10d \
    --rdzv_endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
    --rdzv_id "${RDZV_ID}" \
    ${extra[@]+"${extra[@]}"} \
    -m "${LAUNCH_MODULE}" "$@"
