#!/usr/bin/env bash
# Shows a worker's log of the current run (~/colddiff_run/train.log on that
# worker): the last LINES lines, then follows it (Ctrl-C to leave; the run
# goes on).
#
#   TPU_NAME=colddiff ZONE=us-central2-b launch/tpu_logs.sh [--dry-run]
#
# Environment:
#   TPU_NAME, ZONE  the TPU VM (required); PROJECT (optional)
#   WORKER          worker index (default 0, the one that writes the metrics);
#                   'all' prints the tail of every worker's log, without
#                   following
#   LINES           lines of history to show (default 100)
#   FOLLOW          1 = keep following (default for one worker), 0 = print and exit

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"
shift "$N_OPTS"
[[ $# -eq 0 ]] || die "unexpected arguments: $*"

require_tpu_env
WORKER="${WORKER:-0}"
LINES="${LINES:-100}"
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "WORKER=$WORKER must be a worker index (0, 1, ...) or 'all'."
[[ "$LINES" =~ ^[0-9]+$ ]] || die "LINES=$LINES must be a number of lines."
if [[ "$WORKER" == all ]]; then
  FOLLOW="${FOLLOW:-0}"
  [[ "$FOLLOW" == 0 ]] || die "FOLLOW=1 needs a single WORKER (e.g. WORKER=0)."
else
  FOLLOW="${FOLLOW:-1}"
fi
[[ "$FOLLOW" == 0 || "$FOLLOW" == 1 ]] || die "FOLLOW=$FOLLOW must be 0 or 1."

set_gcloud_flags
follow=""
[[ "$FOLLOW" == 0 ]] || follow=" --follow"
tpu_ssh "$WORKER" "bash $REMOTE_DIR/launch/tpu_worker.sh logs $LINES$follow"
