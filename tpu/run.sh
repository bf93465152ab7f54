#!/usr/bin/env bash
# Run one config on every worker at once, recreating and setting up a preempted TPU first.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

SCRIPT_FLAGS=(config workdir log_dir)
ACCEPTS_ARGS=true
CONFIG='' WORKDIR='' LOG_DIR=''

usage() {
  cat <<USAGE
Usage: tpu/run.sh --project=ID --zone=ZONE --accelerator_type=T \\
         --config=configs/JOB.py[:PRESET] --workdir=gs://BUCKET/PATH [flags] [-- MAIN_FLAGS...]

Runs 'PY main.py --config=... --workdir=... MAIN_FLAGS' in ~/fleming-jax on every worker at
once (--worker=all), one log per worker in LOG_DIR/<worker>.log. First it checks the TPU like
tpu/create.sh does: a missing or preempted one is (re)created and set up (tpu/setup.sh), so
re-running the same command after a preemption resumes from the last checkpoint in WORKDIR.
Under --dry_run the state check is printed and assumed to find the TPU ready.

  --config=FILE[:PRESET]  job config, e.g. configs/sft.py:qwen2.5-7b (required)
  --workdir=gs://...      checkpoints and outputs; a gs:// path, shared by all workers (required);
                          compiled programs are cached beside it in WORKDIR/../xla_cache (config.compile_cache)
  --log_dir=DIR           local folder for the per-worker logs (default: logs/NAME/UTC-TIME)
  -- MAIN_FLAGS...        passed on to main.py, e.g. -- --config.mesh.fsdp=8

USAGE
  common_help
}

parse_flags "$@"
check_create_flags
[[ -n $CONFIG ]] || die "missing --config, e.g. --config=configs/sft.py:qwen2.5-7b"
[[ $WORKDIR == gs://?* ]] ||
  die "--workdir must be a gs:// path (workers share it and it outlives a preemption), got '$WORKDIR'"
LOG_DIR=${LOG_DIR:-logs/$NAME/$(date -u +%Y%m%d-%H%M%S)}

assumed=READY
if [[ $QUEUED == true ]]; then assumed=ACTIVE; fi
ensure_tpu "$assumed"
if [[ $FRESH == true ]]; then setup_workers; fi
run_cmd mkdir -p "$LOG_DIR"
ssh_workers "cd $REMOTE_DIR && $(quote_all "$PYTHON" main.py --config="$CONFIG" --workdir="$WORKDIR" "${ARGS[@]}")" \
  --output-directory="$LOG_DIR"
