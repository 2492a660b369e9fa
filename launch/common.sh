# Helpers shared by the launch scripts; sourced, never run on its own.
#
# Every script takes `--dry-run` as its first argument(s): the commands it
# would run are printed to stdout, one per line, quoted so that the output can
# be pasted into a shell, and nothing is run. Notes go to stderr, so the
# stdout of a dry run is exactly the command list.
# shellcheck shell=bash
# Variables set here are read by the sourcing scripts.
# shellcheck disable=SC2034

DRY_RUN=0
# The checkout these scripts belong to (launch/..).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Where tpu_setup.sh puts the checkout on every worker (relative to $HOME).
REMOTE_DIR="${REMOTE_DIR:-colddiff_jax}"

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

note() {
  echo "$(basename "$0"): $*" >&2
}

# Quotes one word for a POSIX shell: plain words stay as they are, anything
# else is single-quoted (so dry-run output is readable and copy-pasteable).
quote() {
  local s="$1"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Joins the words of a command into one shell line.
quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or prints it under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    echo "+ $(quote_cmd "$@")" >&2
    "$@"
  fi
}

# Replaces this shell by a command (signals then reach it directly), or
# prints it under --dry-run.
run_exec() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    echo "+ $(quote_cmd "$@")" >&2
    exec "$@"
  fi
}

# Consumes the leading script options; the caller then does `shift "$N_OPTS"`.
# Usage text is the script's leading comment block.
parse_common_flags() {
  N_OPTS=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) usage; exit 0 ;;
      *) break ;;
    esac
    shift
    N_OPTS=$((N_OPTS + 1))
  done
}

usage() {
  # Prints the comment block after the shebang of the calling script.
  sed -n '2,/^$/{s/^# \{0,1\}//;p;}' "$0"
}

# Fails with a message naming the variable when it is unset or empty.
require_env() {
  local name="$1" hint="$2"
  if [[ -z "${!name:-}" ]]; then
    die "$name is not set: $hint"
  fi
}

# The TPU VM settings every tpu_*.sh script needs.
require_tpu_env() {
  require_env TPU_NAME "the name of the TPU VM, e.g. export TPU_NAME=colddiff-v4-32"
  require_env ZONE "the zone of the TPU VM, e.g. export ZONE=us-central2-b"
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "TPU_NAME=$TPU_NAME is not a valid TPU name (lower-case letters, digits and '-', starting with a letter)."
}

# `--zone=... [--project=...]`, as one word per flag, in GCLOUD_FLAGS.
set_gcloud_flags() {
  GCLOUD_FLAGS=(--zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    GCLOUD_FLAGS+=(--project="$PROJECT")
  fi
}

# Runs a shell command on TPU workers: tpu_ssh WORKER COMMAND.
tpu_ssh() {
  local worker="$1" command="$2"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    --worker="$worker" --command "$command"
}
