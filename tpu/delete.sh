#!/usr/bin/env bash
# Delete the TPU VM (or queued resource, with its node); nothing to do when it is gone.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: tpu/delete.sh --project=ID --zone=ZONE [--name=NAME] [--queued] [flags]

Deletes the TPU VM NAME (with --queued: the queued resource and its node, --force), without
asking. Safe to re-run: when NAME does not exist it says so and succeeds. Data in gs:// stays.
Under --dry_run the state check is printed and assumed to find the TPU.

USAGE
  common_help
}

parse_flags "$@"
check_tpu_flags
read_state EXISTS
if [[ $STATE == NOT_FOUND ]]; then
  info "$NAME does not exist: nothing to delete"
  exit 0
fi
delete_tpu
