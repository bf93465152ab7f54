#!/usr/bin/env bash
# Copy results back: from a gs:// path, or from a path on one worker.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

SCRIPT_FLAGS=(src dest worker)
SRC='' DEST=. WORKER=0

usage() {
  cat <<USAGE
Usage: tpu/fetch.sh --src=gs://BUCKET/PATH [--dest=DIR]
       tpu/fetch.sh --project=ID --zone=ZONE --src=PATH [--worker=N] [--dest=DIR]

Copies SRC (recursively) into DEST (default: .). A gs:// SRC is copied with
'gcloud storage cp --recursive' and needs no TPU; any other SRC is a path on worker N
(default 0) of the TPU, relative to ~/fleming-jax unless absolute, copied with
'gcloud compute tpus tpu-vm scp --recurse'.

  --src=PATH              what to copy (required)
  --dest=DIR              where to (default: .)
  --worker=N              which worker, for a path on the TPU (default: 0)

USAGE
  common_help
}

parse_flags "$@"
[[ -n $SRC ]] || die "missing --src, e.g. --src=gs://my-bucket/fleming/hf"
if [[ $SRC == gs://* ]]; then
  run_cmd gcloud storage cp --recursive "$SRC" "$DEST"
else
  check_tpu_flags
  [[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index (0, 1, ...), not '$WORKER'"
  if [[ $SRC != /* ]]; then SRC=$REMOTE_DIR/$SRC; fi
  run_cmd gcloud compute tpus tpu-vm scp "$NAME:$SRC" "$DEST" "${LOC[@]}" --worker="$WORKER" --recurse
fi
