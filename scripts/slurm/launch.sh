#!/usr/bin/env bash
# One node's share of a Slurm training job: `python -m pretrain.launch` (torchrun that passes
# SIGTERM/SIGUSR1 to the workers and keeps their exit code) with c10d rendezvous on the job's first
# node. pretrain.sbatch starts it once per node with srun; docs/slurm.md explains the pieces.
#
#   scripts/slurm/launch.sh [--print] RECIPE [key.path=value ...]
#
# --print writes the command instead of running it. Read from the environment: SLURM_JOB_ID,
# SLURM_NNODES, SLURM_JOB_NODELIST (set by Slurm), SLURM_GPUS_ON_NODE or GPUS_PER_NODE (processes per
# node, default 1), SLURM_CPUS_PER_TASK, and optionally PYTHON (default .venv/bin/python) and
# RDZV_PORT (default 29400).
set -euo pipefail

die() {
    echo "error: $*" >&2
    exit 2
}

require_slurm() {
    local name
    for name in SLURM_JOB_ID SLURM_NNODES SLURM_JOB_NODELIST; do
        [[ -n "${!name:-}" ]] || die "scripts/slurm/launch.sh runs inside a Slurm job step (srun): $name is not set"
    done
}

# Processes per node: one per GPU Slurm gave this node.
procs_per_node() {
    local n="${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-1}}"
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "GPUs per node must be a positive integer, got '$n' (SLURM_GPUS_ON_NODE / GPUS_PER_NODE)"
    echo "$n"
}

# The rendezvous host: the first node of the allocation, the same answer on every node.
head_node() {
    local hosts
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [[ ${#hosts[@]} -gt 0 && -n "${hosts[0]}" ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
    echo "${hosts[0]}"
}

# The usual environment of a multi-node NCCL job; values already set by the user win.
export_environment() {
    local procs=$1 threads=1
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && (( SLURM_CPUS_PER_TASK / procs > 1 )); then
        threads=$(( SLURM_CPUS_PER_TASK / procs ))
    fi
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # megatron-core: ordered TP/SP kernels
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a dead peer fails the job, no hang
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
}

# Fills the array CMD with this node's launcher command.
build_command() {
    local recipe=$1 procs head
    shift
    procs=$(procs_per_node)
    head=$(head_node)
    CMD=("${PYTHON:-.venv/bin/python}" -m pretrain.launch
        --nnodes="$SLURM_NNODES" --nproc_per_node="$procs"
        --rdzv_backend=c10d --rdzv_endpoint="$head:${RDZV_PORT:-29400}" --rdzv_id="$SLURM_JOB_ID"
        --max_restarts=0
        pretrain_gpt.py --recipe "$recipe" checkpoint.load=auto "$@")
}

main() {
    local print=0
    if [[ "${1:-}" == "--print" ]]; then
        print=1
        shift
    fi
    [[ $# -ge 1 ]] || die "usage: scripts/slurm/launch.sh [--print] RECIPE [key.path=value ...]"
    require_slurm
    cd "$(dirname "${BASH_SOURCE[0]}")/../.."
    build_command "$@"
    export_environment "$(procs_per_node)"
    if (( print )); then
        local line name
        for name in OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG; do
            line+="$name=$(printf '%q' "${!name}") "
        done
        line+=$(printf '%q ' "${CMD[@]}")
        echo "${line% }"
        return 0
    fi
    exec "${CMD[@]}"
}

main "$@"
