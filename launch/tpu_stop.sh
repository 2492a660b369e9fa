#!/usr/bin/env bash
# Stops the run on every worker: each worker sends SIGTERM to the pid in its
# ~/colddiff_run/train.pid (written by tpu_run.sh), so training saves a
# checkpoint and exits; SIGKILL follows after STOP_TIMEOUT seconds. Processes
# are never matched by name. The TPU VM keeps running (launch/tpu_delete.sh).
#
#   TPU_NAME=colddiff ZONE=us-central2-b launch/tpu_stop.sh [--dry-run]
#
# Environment: TPU_NAME, ZONE (required), PROJECT, STOP_TIMEOUT (default 300).

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"
shift "$N_OPTS"
[[ $# -eq 0 ]] || die "unexpected arguments: $*"

require_tpu_env
STOP_TIMEOUT="${STOP_TIMEOUT:-300}"
[[ "$STOP_TIMEOUT" =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT=$STOP_TIMEOUT is not a number of seconds."
set_gcloud_flags
tpu_ssh all "STOP_TIMEOUT=$STOP_TIMEOUT bash $REMOTE_DIR/launch/tpu_worker.sh stop"
