#!/usr/bin/env bash
# Starts training (or any --mode) on every worker of the TPU VM: the same
# `python -m colddiff_jax.main ARGS` on --worker=all with COLDDIFF_MULTIHOST=1,
# so JAX joins the workers into one multi-controller run. Each worker runs it
# under nohup and appends its output to its own ~/colddiff_run/train.log
# (launch/tpu_logs.sh); the workdir is on gs://, shared by all workers.
#
#   TPU_NAME=colddiff ZONE=us-central2-b BUCKET=my-bucket \
#     launch/tpu_run.sh [--dry-run] --config=configs/celeba_blur.py [ARGS...]
#
# Environment:
#   TPU_NAME, ZONE  the TPU VM (required); PROJECT (optional)
#   BUCKET          Cloud Storage bucket of the workdir (required unless
#                   WORKDIR is set), with or without gs://
#   RUN_NAME        the run's folder in the bucket (default: the config file's
#                   name, e.g. celeba_blur)
#   WORKDIR         the whole workdir (default gs://$BUCKET/colddiff_jax/$RUN_NAME);
#                   running again with the same workdir resumes training
#   REMOTE_DIR      the checkout on the workers (default colddiff_jax)
#
# The workdir is chosen here: do not pass --workdir in ARGS.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"
shift "$N_OPTS"

require_tpu_env
config=""
for arg in "$@"; do
  case "$arg" in
    --config=*) config="${arg#--config=}" ;;
    --workdir|--workdir=*) die "do not pass --workdir: set WORKDIR (or BUCKET and RUN_NAME) instead." ;;
    --config) die "write --config=FILE (with '='), so that the run name can be read from it." ;;
  esac
done
[[ -n "$config" ]] || die "missing --config=configs/<experiment>.py: pass the arguments of colddiff_jax.main after the script's options."

if [[ -z "${WORKDIR:-}" ]]; then
  require_env BUCKET "the Cloud Storage bucket for the workdir, e.g. export BUCKET=my-bucket (or set WORKDIR=gs://...)"
  # shellcheck disable=SC2153  # BUCKET is checked by require_env above.
  bucket="${BUCKET#gs://}"
  bucket="${bucket%/}"
  if [[ -z "${RUN_NAME:-}" ]]; then
    # configs/celeba_blur.py:smoke -> celeba_blur_smoke.
    RUN_NAME="$(basename "${config%%:*}" .py)"
    if [[ "$config" == *:?* ]]; then
      RUN_NAME+="_${config#*:}"
    fi
  fi
  [[ "$RUN_NAME" =~ ^[A-Za-z0-9_.=-]+$ ]] || die "RUN_NAME=$RUN_NAME: use letters, digits, '_', '-', '.', '='."
  WORKDIR="gs://$bucket/colddiff_jax/$RUN_NAME"
fi
if [[ "$WORKDIR" != gs://* ]]; then
  note "warning: WORKDIR=$WORKDIR is not on gs://; every worker must see the same folder (checkpoints are written by all of them)."
fi

set_gcloud_flags
tpu_ssh all "COLDDIFF_MULTIHOST=1 bash $REMOTE_DIR/launch/tpu_worker.sh start $(quote_cmd "$@" --workdir="$WORKDIR")"
note "workdir: $WORKDIR; follow it with launch/tpu_logs.sh, stop it with launch/tpu_stop.sh."
