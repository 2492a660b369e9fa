#!/usr/bin/env bash
# Runs ON a TPU VM worker (the tpu_*.sh scripts call it on every worker over
# `gcloud compute tpus tpu-vm ssh --worker=all`); big_vision's run_tpu.sh role.
#
#   launch/tpu_worker.sh [--dry-run] setup
#       venv + jax[tpu] + requirements.txt (skipped parts that exist).
#   launch/tpu_worker.sh [--dry-run] start ARGS...
#       python -m colddiff_jax.main ARGS... in the background (nohup), output
#       appended to $COLDDIFF_RUN_DIR/train.log, pid in .../train.pid.
#   launch/tpu_worker.sh [--dry-run] stop
#       SIGTERM to the pid of the pid file (training saves a checkpoint and
#       exits), SIGKILL after $STOP_TIMEOUT seconds; never kills by name.
#   launch/tpu_worker.sh status
#   launch/tpu_worker.sh logs [LINES] [--follow]
#
# Environment: COLDDIFF_VENV (default ~/colddiff_venv), COLDDIFF_RUN_DIR
# (default ~/colddiff_run), STOP_TIMEOUT (default 300), and whatever the run
# needs (COLDDIFF_MULTIHOST=1 on pods, TFDS_DATA_DIR, ...), passed through.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"
shift "$N_OPTS"
[[ $# -gt 0 ]] || die "missing subcommand: setup | start ARGS... | stop | status | logs [LINES] [--follow]"
subcommand="$1"
shift

VENV="${COLDDIFF_VENV:-$HOME/colddiff_venv}"
RUN_DIR="${COLDDIFF_RUN_DIR:-$HOME/colddiff_run}"
LOG="$RUN_DIR/train.log"
PID_FILE="$RUN_DIR/train.pid"
STOP_TIMEOUT="${STOP_TIMEOUT:-300}"
[[ "$STOP_TIMEOUT" =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT=$STOP_TIMEOUT is not a number of seconds."
# Configs are given relative to the checkout (--config=configs/...).
cd "$REPO_ROOT"

# The pid of the pid file if that process is still our training run, else "".
# The command-line check guards against a pid reused by another process.
running_pid() {
  local pid
  [[ -f "$PID_FILE" ]] || return 0
  pid="$(<"$PID_FILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] || die "$PID_FILE does not hold a pid ('$pid'); remove it."
  if kill -0 "$pid" 2>/dev/null && ps -p "$pid" -o args= | grep -q 'colddiff_jax\.main'; then
    echo "$pid"
  fi
}

case "$subcommand" in
  setup)
    [[ $# -eq 0 ]] || die "setup takes no arguments."
    jax_version="$(sed -n 's/^jax==\([^ ]*\).*$/\1/p' requirements.txt)"
    [[ -n "$jax_version" ]] || die "requirements.txt pins no jax==VERSION."
    if [[ ! -x "$VENV/bin/python" ]]; then
      if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        run python3 -m venv "$VENV"
      else
        # JAX needs Python >= 3.11; the v4 image (Ubuntu 22.04) has 3.10.
        # uv fetches a standalone 3.11. The variable lets pip install into a
        # PEP 668 system Python (newer images); older pips ignore it.
        run env PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet uv
        run "$HOME/.local/bin/uv" venv --seed --python 3.11 "$VENV"
      fi
    fi
    run "$VENV/bin/python" -m pip install --quiet --upgrade pip
    run "$VENV/bin/python" -m pip install --quiet -r requirements.txt "jax[tpu]==$jax_version"
    run "$VENV/bin/python" -m pip check
    run "$VENV/bin/python" -c 'import jax, colddiff_jax; print("jax", jax.__version__, "ready")'
    ;;

  start)
    [[ $# -gt 0 ]] || die "start needs the arguments of colddiff_jax.main, e.g. --config=configs/celeba_blur.py --workdir=gs://..."
    [[ "$DRY_RUN" == 1 || -x "$VENV/bin/python" ]] \
      || die "no virtualenv at $VENV: run launch/tpu_setup.sh (or 'launch/tpu_worker.sh setup' here) first."
    pid="$(running_pid)"
    [[ -z "$pid" ]] || die "a run is already going (pid $pid, $PID_FILE); stop it first (launch/tpu_stop.sh)."
    cmd=("$VENV/bin/python" -m colddiff_jax.main "$@")
    if [[ "$DRY_RUN" == 1 ]]; then
      printf 'nohup %s </dev/null >>%s 2>&1 &\n' "$(quote_cmd "${cmd[@]}")" "$(quote "$LOG")"
      printf 'echo $! >%s\n' "$(quote "$PID_FILE")"
      exit 0
    fi
    mkdir -p "$RUN_DIR"
    echo "==== $(date -u '+%Y-%m-%dT%H:%M:%SZ') $(hostname): $(quote_cmd "${cmd[@]}")" >>"$LOG"
    # Detached from the ssh session: no terminal, output to this worker's log.
    nohup "${cmd[@]}" </dev/null >>"$LOG" 2>&1 &
    echo "$!" >"$PID_FILE.tmp"
    mv "$PID_FILE.tmp" "$PID_FILE"
    note "started pid $! on $(hostname); log: $LOG"
    ;;

  stop)
    [[ $# -eq 0 ]] || die "stop takes no arguments."
    pid="$(running_pid)"
    if [[ -z "$pid" ]]; then
      note "no run going on $(hostname)."
      [[ "$DRY_RUN" == 1 ]] || rm -f "$PID_FILE"
      exit 0
    fi
    run kill -TERM "$pid"
    [[ "$DRY_RUN" == 0 ]] || exit 0
    # SIGTERM makes training save a checkpoint first: give it time.
    for ((waited = 0; waited < STOP_TIMEOUT; waited++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      note "pid $pid still running after ${STOP_TIMEOUT}s; sending SIGKILL."
      kill -KILL "$pid"
    fi
    rm -f "$PID_FILE"
    note "stopped pid $pid on $(hostname)."
    ;;

  status)
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
      echo "$(hostname): running (pid $pid), log $LOG"
    else
      echo "$(hostname): not running"
    fi
    ;;

  logs)
    lines=100 follow=()
    for arg in "$@"; do
      case "$arg" in
        --follow) follow=(-F) ;;
        *) [[ "$arg" =~ ^[0-9]+$ ]] || die "logs takes [LINES] [--follow], not '$arg'."
           lines="$arg" ;;
      esac
    done
    [[ -f "$LOG" || "$DRY_RUN" == 1 ]] || die "no log at $LOG on $(hostname): nothing was started here."
    run tail -n "$lines" "${follow[@]}" "$LOG"
    ;;

  *)
    die "unknown subcommand '$subcommand': setup | start ARGS... | stop | status | logs [LINES] [--follow]"
    ;;
esac
