# shellcheck shell=bash
# Sourced by the tpu/*.sh scripts (not run on its own): flag and env-file parsing,
# validation, `run_cmd` (prints under --dry_run, else runs), and the TPU VM / queued-resource
# steps that several scripts share. Needs bash >= 4.4.
# shellcheck disable=SC2034 # variables set here (ARGS, FRESH, LOC, ...) are read by the scripts

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=fleming-jax # the checkout on every worker, relative to the worker's home

# Accelerator types the scripts accept (gcloud's names: v4 and v5p count TensorCores, v5e
# (v5litepod) and v6e count chips). Deliberately short: add a size here when you need it.
ACCELERATOR_TYPES=(v4-8 v4-16 v4-32 v4-64 v4-128 v4-256 v4-512
  v5litepod-1 v5litepod-4 v5litepod-8 v5litepod-16 v5litepod-32 v5litepod-64 v5litepod-128 v5litepod-256
  v5p-8 v5p-16 v5p-32 v5p-64 v5p-128 v5p-256 v5p-512 v5p-1024
  v6e-1 v6e-4 v6e-8 v6e-16 v6e-32 v6e-64 v6e-128 v6e-256)

# Flags every script takes, with their defaults. Each is also a key of the env file, in
# upper case (--accelerator_type= <-> ACCELERATOR_TYPE=). The process environment is not read.
COMMON_FLAGS=(project zone name accelerator_type version spot preemptible queued repo ref python post_setup
  poll_seconds)
BOOL_FLAGS=(spot preemptible queued)
SCRIPT_FLAGS=() # a script's own flags, set before parse_flags
ACCEPTS_ARGS=false # true: words after -- go to ARGS
PROJECT='' ZONE='' NAME=fleming-jax ACCELERATOR_TYPE='' VERSION='' SPOT=false PREEMPTIBLE=false
QUEUED=false REPO='' REF=main PYTHON=python3 POST_SETUP='' POLL_SECONDS=60 DRY_RUN=false
ARGS=()

common_help() {
  cat <<HELP
Common flags (each also settable in the env file as KEY=value, e.g. PROJECT=my-project):
  --project=ID            GCP project (required)
  --zone=ZONE             e.g. us-central2-b (required)
  --name=NAME             TPU VM / queued resource name (default: fleming-jax)
  --accelerator_type=T    one of: ${ACCELERATOR_TYPES[*]}
  --version=V             TPU runtime (default: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite
                          for v5litepod, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  --spot | --preemptible  capacity kind (default: on-demand); queued resources take --spot only
  --queued                use a queued resource (gcloud compute tpus queued-resources)
  --repo=URL --ref=REF    set up workers from a git clone (default: copy this checkout's HEAD)
  --python=PY             interpreter on the workers (default: python3)
  --post_setup=CMD        shell command that ends the setup on every worker, run in
                          ~/fleming-jax (e.g. downloading the base model); also after a
                          re-creation by tpu/run.sh
  --poll_seconds=N        queued resources: seconds between state checks (default: 60)
  --env_file=FILE         KEY=value defaults (default: tpu/tpu.env if it exists; flags win)
  --dry_run               print every command (one per line, shell-quoted) and run nothing
  --help
HELP
}

info() { echo "$(basename "$0"): $*" >&2; }
die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}
in_list() { # in_list WORD LIST...
  local word=$1 item
  shift
  for item in "$@"; do [[ $item == "$word" ]] && return 0; done
  return 1
}

# One word shell-quoted the way Python's shlex.quote does it; quote_all joins several.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}
quote_all() {
  local sep='' word
  for word in "$@"; do
    printf '%s%s' "$sep" "$(quote "$word")"
    sep=' '
  done
}

# run_cmd CMD...: under --dry_run print CMD (stdout, one line); else echo it to stderr and run it.
run_cmd() {
  if [[ $DRY_RUN == true ]]; then
    quote_all "$@"
    echo
    return 0
  fi
  echo "+ $(quote_all "$@")" >&2
  "$@"
}

set_flag() { # set_flag NAME VALUE (NAME as on the command line, e.g. accelerator_type)
  if in_list "$1" "${BOOL_FLAGS[@]}" && [[ $2 != true && $2 != false ]]; then
    die "--$1 takes true or false, not '$2'"
  fi
  printf -v "${1^^}" '%s' "$2"
}

# parse_flags "$@": the common flags plus the script's SCRIPT_FLAGS (names without --);
# words after `--` land in ARGS when the script sets ACCEPTS_ARGS=true.
parse_flags() {
  local allowed=("${COMMON_FLAGS[@]}" "${SCRIPT_FLAGS[@]}") given=() env_file='' arg key
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --help | -h) usage; exit 0 ;;
      --dry_run) DRY_RUN=true; continue ;;
      --env_file=*) env_file=${arg#*=}; [[ -f $env_file ]] || die "--env_file: no such file: $env_file"; continue ;;
      --) [[ $ACCEPTS_ARGS == true ]] || die "unexpected arguments after --: $*"; ARGS=("$@"); break ;;
      --*=*) key=${arg%%=*} ;;
      --*) key=$arg ;;
      *) die "unexpected argument '$arg' (flags look like --name=value; see --help)" ;;
    esac
    key=${key#--}
    in_list "$key" "${allowed[@]}" ||
      die "unknown flag --$key; flags: $(printf -- '--%s ' "${allowed[@]}")--env_file --dry_run --help"
    if [[ $arg == *=* ]]; then
      set_flag "$key" "${arg#*=}"
    elif in_list "$key" "${BOOL_FLAGS[@]}"; then
      set_flag "$key" true
    else
      die "--$key needs a value: --$key=VALUE"
    fi
    given+=("$key")
  done
  if [[ -z $env_file && -f $ROOT/tpu/tpu.env ]]; then env_file=$ROOT/tpu/tpu.env; fi
  if [[ -n $env_file ]]; then load_env_file "$env_file" "${given[@]}"; fi
}

# load_env_file FILE GIVEN...: KEY=value lines ('#' comments, optional quotes around the value);
# keys are the common flags in upper case; a flag given on the command line (GIVEN) wins.
load_env_file() {
  local file=$1 line key value n=0
  shift
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    [[ $line =~ ^([A-Z_]+)=(.*)$ ]] || die "$file:$n: expected KEY=value, got: $line"
    key=${BASH_REMATCH[1],,} value=${BASH_REMATCH[2]}
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then value=${BASH_REMATCH[1]}; fi
    in_list "$key" "${COMMON_FLAGS[@]}" || die "$file:$n: unknown key ${key^^}; keys: ${COMMON_FLAGS[*]^^}"
    in_list "$key" "$@" || set_flag "$key" "$value"
  done <"$file"
}

# check_tpu_flags: project, zone and name; sets LOC. Fails before anything runs.
check_tpu_flags() {
  [[ -n $PROJECT ]] || die "missing --project (or PROJECT= in the env file)"
  [[ -n $ZONE ]] || die "missing --zone (or ZONE= in the env file), e.g. --zone=us-central2-b"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name='$NAME' must be lower-case letters, digits and hyphens, starting with a letter"
  [[ $POLL_SECONDS =~ ^[0-9]+$ ]] || die "--poll_seconds must be a whole number, not '$POLL_SECONDS'"
  LOC=(--project="$PROJECT" --zone="$ZONE")
}

# check_create_flags: check_tpu_flags, and what creating the TPU needs: a known accelerator
# type, the runtime version (defaulted per TPU generation), one capacity kind.
check_create_flags() {
  check_tpu_flags
  if [[ -z $ACCELERATOR_TYPE ]]; then
    die "missing --accelerator_type (or ACCELERATOR_TYPE= in the env file); valid: ${ACCELERATOR_TYPES[*]}"
  elif ! in_list "$ACCELERATOR_TYPE" "${ACCELERATOR_TYPES[@]}"; then
    die "unknown --accelerator_type=$ACCELERATOR_TYPE; valid: ${ACCELERATOR_TYPES[*]}"
  fi
  if [[ -z $VERSION ]]; then
    case $ACCELERATOR_TYPE in
      v4-*) VERSION=tpu-ubuntu2204-base ;;
      v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) VERSION=v2-alpha-tpuv5 ;;
      v6e-*) VERSION=v2-alpha-tpuv6e ;;
    esac
  fi
  if [[ $SPOT == true && $PREEMPTIBLE == true ]]; then die "--spot and --preemptible exclude each other"; fi
  if [[ $QUEUED == true && $PREEMPTIBLE == true ]]; then die "queued resources take --spot, not --preemptible"; fi
  return 0
}

# read_state ASSUMED: STATE := the TPU VM's state (or the queued resource's), NOT_FOUND when
# there is none. Under --dry_run it prints the describe command and assumes ASSUMED.
read_state() {
  local kind=tpu-vm field=state err out
  if [[ $QUEUED == true ]]; then kind=queued-resources field=state.state; fi
  local cmd=(gcloud compute tpus "$kind" describe "$NAME" "${LOC[@]}" --format="value($field)")
  if [[ $DRY_RUN == true ]]; then
    run_cmd "${cmd[@]}"
    STATE=$1
    return 0
  fi
  echo "+ $(quote_all "${cmd[@]}")" >&2
  err=$(mktemp)
  if out=$("${cmd[@]}" 2>"$err"); then
    STATE=$out
  elif grep -qE "NOT_FOUND|Not Found|HTTPError 404" "$err"; then
    STATE=NOT_FOUND
  else
    cat "$err" >&2
    rm -f "$err"
    die "could not read the state of $NAME (see the gcloud error above)"
  fi
  rm -f "$err"
}

create_tpu() {
  local capacity=()
  if [[ $SPOT == true ]]; then capacity=(--spot); fi
  if [[ $PREEMPTIBLE == true ]]; then capacity=(--preemptible); fi
  if [[ $QUEUED == true ]]; then
    run_cmd gcloud compute tpus queued-resources create "$NAME" "${LOC[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$VERSION" "${capacity[@]}"
  else
    run_cmd gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION" "${capacity[@]}"
  fi
}

delete_tpu() {
  if [[ $QUEUED == true ]]; then
    run_cmd gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

wait_until_active() { # a queued resource: poll until its node is provisioned
  while true; do
    read_state ACTIVE
    case $STATE in
      ACTIVE) return 0 ;;
      CREATING | ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES)
        info "queued resource $NAME is $STATE; checking again in ${POLL_SECONDS}s"
        sleep "$POLL_SECONDS" ;;
      *) die "queued resource $NAME is $STATE; see gcloud compute tpus queued-resources describe $NAME ${LOC[*]}" ;;
    esac
  done
}

# ensure_tpu ASSUMED: leaves NAME ready to use, whatever state it is found in (ASSUMED under
# --dry_run): creates it when missing, deletes and recreates it when preempted (spot and
# preemptible TPUs cannot be restarted), starts it when stopped, waits for a queued resource.
# FRESH=true when the workers are new and need tpu/setup.sh.
ensure_tpu() {
  FRESH=false
  read_state "$1"
  case $STATE in
    READY | ACTIVE) info "$NAME is $STATE"; return 0 ;;
    NOT_FOUND) info "$NAME does not exist: creating it" ;;
    PREEMPTED | TERMINATED | SUSPENDING | SUSPENDED | FAILED)
      info "$NAME is $STATE: deleting and recreating it"
      delete_tpu ;;
    STOPPED)
      info "$NAME is STOPPED: starting it"
      run_cmd gcloud compute tpus tpu-vm start "$NAME" "${LOC[@]}"
      return 0 ;;
    CREATING | ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES)
      [[ $QUEUED == true ]] || die "$NAME is $STATE; run this again once it is READY"
      FRESH=true
      wait_until_active
      return 0 ;;
    *) die "$NAME is '$STATE'; run this again once it is READY, or delete it with tpu/delete.sh" ;;
  esac
  create_tpu
  FRESH=true
  if [[ $QUEUED == true ]]; then wait_until_active; fi
}

# ssh_workers COMMAND [GCLOUD_FLAG...]: COMMAND on every worker at once.
ssh_workers() {
  local command=$1
  shift
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --command="$command" "$@"
}

# setup_workers: the code (a copy of this checkout's HEAD, or a git clone of --repo at --ref)
# in ~/fleming-jax on every worker, then requirements.txt, jax[tpu] of the pinned version and
# the --post_setup command.
setup_workers() {
  local jax get_code py install
  jax=$(sed -n 's/^jax==//p' "$ROOT/requirements.txt")
  [[ -n $jax ]] || die "no jax==VERSION line in $ROOT/requirements.txt"
  py=$(quote "$PYTHON")
  if [[ -z $REPO ]]; then
    git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "$ROOT is not a git checkout; pass --repo=URL"
    if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
      info "warning: uncommitted changes are not copied (setup ships the committed HEAD)"
    fi
    local tarball=${TMPDIR:-/tmp}/fleming-jax-$NAME.tar.gz
    run_cmd git -C "$ROOT" archive --format=tar.gz --output="$tarball" HEAD
    run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_DIR.tar.gz" "${LOC[@]}" --worker=all
    run_cmd rm -f "$tarball"
    get_code="mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR"
  else
    get_code="{ [ -d $REMOTE_DIR/.git ] || git clone -q $(quote "$REPO") $REMOTE_DIR; }"
    get_code+=" && git -C $REMOTE_DIR fetch -q origin $(quote "$REF") && git -C $REMOTE_DIR checkout -q --force FETCH_HEAD"
  fi
  install="$py -m pip install -q -r requirements.txt && $py -m pip install -q $(quote "jax[tpu]==$jax")"
  ssh_workers "$get_code && cd $REMOTE_DIR && $install${POST_SETUP:+ && $POST_SETUP}"
}
