#!/usr/bin/env bash
# Creates a Cloud TPU VM (a single host or a pod slice).
#
#   TPU_NAME=colddiff ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#     launch/tpu_create.sh [--dry-run]
#
# Environment:
#   TPU_NAME          name of the TPU VM (required)
#   ZONE              its zone (required)
#   ACCELERATOR_TYPE  e.g. v4-8, v4-32, v5litepod-16, v5p-32, v6e-16 (required)
#   RUNTIME_VERSION   TPU software version (default: the one Google lists for
#                     JAX on that generation: tpu-ubuntu2204-base for v2-v4,
#                     v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e)
#   PROJECT           Google Cloud project (default: gcloud's configured one)
#   SPOT=1            create a Spot TPU (cheaper, may be preempted; training
#                     resumes from the last checkpoint when run again)
#
# Next: launch/tpu_setup.sh.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"
shift "$N_OPTS"
[[ $# -eq 0 ]] || die "unexpected arguments: $*"

require_tpu_env
require_env ACCELERATOR_TYPE "the TPU type and size, e.g. export ACCELERATOR_TYPE=v4-32"
[[ "$ACCELERATOR_TYPE" =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] \
  || die "ACCELERATOR_TYPE=$ACCELERATOR_TYPE is not of the form <generation>-<cores or chips>, e.g. v4-32 or v5litepod-16."

if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  case "${ACCELERATOR_TYPE%-*}" in
    v2|v3|v4) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod|v5e) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE: set RUNTIME_VERSION (see 'gcloud compute tpus tpu-vm versions list --zone=$ZONE')." ;;
  esac
fi

set_gcloud_flags
create=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if [[ "${SPOT:-0}" == 1 ]]; then
  create+=(--spot)
fi
run "${create[@]}"
