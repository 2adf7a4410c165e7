#!/bin/bash
# Single-node launch: launch/local.sh [NPROC] --config configs/x.yaml [key=value ...]
# NPROC defaults to the number of visible GPUs (1 without GPUs). LONGCTX_DRY_RUN=1 prints the command.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    NPROC="$1"
    shift
else
    NPROC="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || NPROC=1
fi

# Same flight-recorder / error-handling defaults as the Slurm script (docs/launch.md).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
# Newer torch reads TORCH_FR_BUFFER_SIZE (and warns that the NCCL name is deprecated); set that instead
if [[ -z "${TORCH_FR_BUFFER_SIZE:-}" ]]; then
    export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
fi
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

CMD=(torchrun --standalone --nproc_per_node "$NPROC"
     --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
     "$ROOT/train.py" "$@")

print_cmd() {
    # Quoted only where needed, so the printed line can be pasted back into a shell.
    local out=() w q
    for w in "$@"; do
        if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+=("$w")
        elif [[ "$w" != *"'"* ]]; then
            out+=("'$w'")
        else
            printf -v q '%q' "$w"
            out+=("$q")
        fi
    done
    echo "${out[*]}"
}

if [[ "${LONGCTX_DRY_RUN:-0}" == "1" ]]; then
    print_cmd "${CMD[@]}"
    exit 0
fi
exec "${CMD[@]}"
