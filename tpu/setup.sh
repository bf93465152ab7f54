#!/usr/bin/env bash
# Put the code and its requirements on every worker of the TPU VM.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
Usage: tpu/setup.sh --project=ID --zone=ZONE [--repo=URL [--ref=REF]] [flags]

On every worker at once (--worker=all): puts the code in ~/fleming-jax (default: a copy of
this checkout's committed HEAD via git archive + scp; with --repo: git clone/fetch of REF),
then runs 'PY -m pip install -r requirements.txt' and 'PY -m pip install jax[tpu]==V' with V
the jax pin of requirements.txt. Safe to re-run.

USAGE
  common_help
}

parse_flags "$@"
check_tpu_flags
setup_workers
