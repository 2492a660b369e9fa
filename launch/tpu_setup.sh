#!/usr/bin/env bash
# Copies this checkout to every worker of the TPU VM and installs it there
# (venv + jax[tpu] + requirements.txt, see tpu_worker.sh setup). Run it again
# after changing the code: the copy is replaced, the venv is kept.
#
#   TPU_NAME=colddiff ZONE=us-central2-b launch/tpu_setup.sh [--dry-run]
#
# Environment:
#   TPU_NAME, ZONE  the TPU VM (required); PROJECT (optional)
#   REPO_URL        clone this git URL on the workers instead of copying the
#                   local checkout (REPO_REF: branch, tag or commit; default
#                   the remote's default branch)
#   REMOTE_DIR      folder of the checkout on the workers, relative to $HOME
#                   (default colddiff_jax)
#
# Without REPO_URL the local files are packed (tar, without .git, runs/ and
# caches) and sent with `gcloud compute tpus tpu-vm scp --worker=all`.
#
# Next: launch/tpu_run.sh.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"
shift "$N_OPTS"
[[ $# -eq 0 ]] || die "unexpected arguments: $*"

require_tpu_env
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ && "$REMOTE_DIR" != *..* ]] \
  || die "REMOTE_DIR=$REMOTE_DIR must be a plain path relative to the workers' home folder."
set_gcloud_flags
worker_setup="bash $REMOTE_DIR/launch/tpu_worker.sh setup"

if [[ -n "${REPO_URL:-}" ]]; then
  fetch="rm -rf $REMOTE_DIR && git clone --quiet $(quote "$REPO_URL") $REMOTE_DIR"
  if [[ -n "${REPO_REF:-}" ]]; then
    fetch+=" && git -C $REMOTE_DIR checkout --quiet $(quote "$REPO_REF")"
  fi
  tpu_ssh all "$fetch && $worker_setup"
else
  tarball="${TMPDIR:-/tmp}/colddiff_jax-$TPU_NAME.tar.gz"
  run tar -czf "$tarball" -C "$REPO_ROOT" --exclude=.git --exclude=runs \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.venv --exclude=venv .
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:colddiff_jax.tar.gz" \
    "${GCLOUD_FLAGS[@]}" --worker=all
  tpu_ssh all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf colddiff_jax.tar.gz -C $REMOTE_DIR && rm colddiff_jax.tar.gz && $worker_setup"
  run rm -f "$tarball"
fi
