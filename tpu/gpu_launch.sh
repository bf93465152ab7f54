#!/usr/bin/env bash
# Multi-node GPU launcher: turns SLURM or torchrun-style variables into the FLEMING_* contract
# that fleming_jax/parallel.py hands to jax.distributed.initialize, then runs the command.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: tpu/gpu_launch.sh [--dry_run] [--] COMMAND...
  e.g. srun --ntasks-per-node=1 tpu/gpu_launch.sh python main.py --config=configs/sft.py:qwen2.5-7b

Runs COMMAND (one process per node, seeing all of its GPUs) with these set:
  FLEMING_COORDINATOR_ADDRESS  host:port of process 0's coordinator
  FLEMING_NUM_PROCESSES        number of processes
  FLEMING_PROCESS_ID           this process's index, 0 .. FLEMING_NUM_PROCESSES-1
taken from, in this order:
  1. FLEMING_* already set: kept (all three must be).
  2. SLURM (under srun): first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST, expanded
     by scontrol) : MASTER_PORT if set, else 20000 + SLURM_JOB_ID % 10000; SLURM_NTASKS;
     SLURM_PROCID.
  3. torchrun style: MASTER_ADDR : MASTER_PORT (+1 under torchrun itself, whose agent holds
     MASTER_PORT, told by TORCHELASTIC_USE_AGENT_STORE=True); WORLD_SIZE; RANK.
  4. none of these: COMMAND runs as a single process, nothing set.
--dry_run prints the command with the variables it would set (env NAME=VALUE ... COMMAND).
USAGE
}

while (($#)); do
  case $1 in
    --help | -h) usage; exit 0 ;;
    --dry_run) DRY_RUN=true; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
(($#)) || die "no command given, e.g. tpu/gpu_launch.sh python main.py --config=configs/sft.py"

need() { # need VAR...: each must be set and non-empty
  local var
  for var in "$@"; do [[ -n ${!var:-} ]] || die "$var is not set (needed with $origin)"; done
}

# launch VAR=VALUE... COMMAND...: print it under --dry_run, else replace this shell with it
launch() {
  if [[ $DRY_RUN == true ]]; then
    quote_all env "$@"
    echo
    exit 0
  fi
  exec env "$@"
}

if [[ -n ${FLEMING_COORDINATOR_ADDRESS:-}${FLEMING_NUM_PROCESSES:-}${FLEMING_PROCESS_ID:-} ]]; then
  origin="FLEMING_* variables"
  need FLEMING_COORDINATOR_ADDRESS FLEMING_NUM_PROCESSES FLEMING_PROCESS_ID
elif [[ -n ${SLURM_PROCID:-} ]]; then
  origin=SLURM
  need SLURM_NTASKS
  nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
  [[ -n $nodelist ]] || die "neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set"
  command -v scontrol >/dev/null || die "scontrol not found: needed to expand the SLURM node list"
  host=$(scontrol show hostnames "$nodelist" | head -n 1)
  [[ -n ${MASTER_PORT:-} ]] || need SLURM_JOB_ID
  FLEMING_COORDINATOR_ADDRESS=$host:${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
  FLEMING_NUM_PROCESSES=$SLURM_NTASKS
  FLEMING_PROCESS_ID=$SLURM_PROCID
elif [[ -n ${MASTER_ADDR:-}${WORLD_SIZE:-}${RANK:-} ]]; then
  origin="torchrun-style variables"
  need MASTER_ADDR MASTER_PORT WORLD_SIZE RANK
  port=$MASTER_PORT
  if [[ ${TORCHELASTIC_USE_AGENT_STORE:-} == True ]]; then port=$((MASTER_PORT + 1)); fi
  FLEMING_COORDINATOR_ADDRESS=$MASTER_ADDR:$port
  FLEMING_NUM_PROCESSES=$WORLD_SIZE
  FLEMING_PROCESS_ID=$RANK
else
  info "no SLURM, torchrun or FLEMING_* variables: running one process"
  launch "$@"
fi

[[ $FLEMING_COORDINATOR_ADDRESS =~ ^[^:]+:[0-9]+$ ]] ||
  die "coordinator address '$FLEMING_COORDINATOR_ADDRESS' is not host:port ($origin)"
[[ $FLEMING_NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] ||
  die "number of processes '$FLEMING_NUM_PROCESSES' is not a positive integer ($origin)"
if ! [[ $FLEMING_PROCESS_ID =~ ^[0-9]+$ ]] || ((FLEMING_PROCESS_ID >= FLEMING_NUM_PROCESSES)); then
  die "process id '$FLEMING_PROCESS_ID' is not in 0..$((FLEMING_NUM_PROCESSES - 1)) ($origin)"
fi
info "$origin: process $FLEMING_PROCESS_ID of $FLEMING_NUM_PROCESSES, coordinator $FLEMING_COORDINATOR_ADDRESS"
launch FLEMING_COORDINATOR_ADDRESS="$FLEMING_COORDINATOR_ADDRESS" \
  FLEMING_NUM_PROCESSES="$FLEMING_NUM_PROCESSES" FLEMING_PROCESS_ID="$FLEMING_PROCESS_ID" "$@"
