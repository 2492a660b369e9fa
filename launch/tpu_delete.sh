#!/usr/bin/env bash
# Deletes the TPU VM (and with it everything on its disks; the workdir on
# gs:// stays).
#
#   TPU_NAME=colddiff ZONE=us-central2-b launch/tpu_delete.sh [--dry-run]
#
# Environment: TPU_NAME, ZONE (required), PROJECT (optional).

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"
shift "$N_OPTS"
[[ $# -eq 0 ]] || die "unexpected arguments: $*"

require_tpu_env
set_gcloud_flags
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
