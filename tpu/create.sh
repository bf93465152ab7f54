#!/usr/bin/env bash
# Create the TPU VM (or queued resource) unless it already exists and is usable.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: tpu/create.sh --project=ID --zone=ZONE --accelerator_type=T [flags]

Creates the TPU VM or pod slice NAME. Safe to re-run: a READY/ACTIVE one is left alone, a
preempted/terminated (or suspended/failed queued) one is deleted and recreated, a stopped one
is started. A queued resource is waited for until ACTIVE. Under --dry_run the state check is
printed and assumed to find nothing, so the create command follows.

USAGE
  common_help
}

parse_flags "$@"
check_create_flags
ensure_tpu NOT_FOUND
if [[ $FRESH == true ]]; then info "next: tpu/setup.sh (the workers are bare)"; fi
