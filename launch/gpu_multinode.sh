#!/usr/bin/env bash
# Runs one process of a multi-node GPU training: start it on each of the
# NUM_NODES nodes (same arguments, its own NODE_RANK), every process using all
# the GPUs of its node. Node 0 hosts the coordinator that JAX's distributed
# runtime connects the others through.
#
#   COORDINATOR=10.0.0.1:12345 NUM_NODES=2 NODE_RANK=0 \
#     launch/gpu_multinode.sh [--dry-run] --config=configs/celeba_blur.py \
#       --workdir=/shared/runs/celeba_blur [ARGS...]
#
# Environment:
#   COORDINATOR  host:port of node 0, reachable from every node (required)
#   NUM_NODES    number of nodes, i.e. processes (required)
#   NODE_RANK    this node's index, 0 .. NUM_NODES-1 (required)
#   PYTHON       interpreter with colddiff_jax's requirements and jax[cuda12]
#                (default: python3)
#
# ARGS go to `python -m colddiff_jax.main`, which gets --coordinator_address,
# --num_processes and --process_id from these variables. The workdir must be
# one folder that every node sees (a shared file system or gs://).

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"
shift "$N_OPTS"

require_env COORDINATOR "host:port of node 0, e.g. export COORDINATOR=10.0.0.1:12345"
require_env NUM_NODES "the number of nodes, e.g. export NUM_NODES=2"
require_env NODE_RANK "this node's index from 0 to NUM_NODES-1, e.g. export NODE_RANK=0"
[[ "$COORDINATOR" =~ ^[^:[:space:]]+:[0-9]+$ || "$COORDINATOR" =~ ^\[[0-9A-Fa-f:.]+\]:[0-9]+$ ]] \
  || die "COORDINATOR=$COORDINATOR is not host:port (e.g. 10.0.0.1:12345)."
[[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || die "NUM_NODES=$NUM_NODES is not a positive integer."
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NODE_RANK=$NODE_RANK is not a non-negative integer."
((NODE_RANK < NUM_NODES)) || die "NODE_RANK=$NODE_RANK must be below NUM_NODES=$NUM_NODES (ranks are 0..$((NUM_NODES - 1)))."
[[ $# -gt 0 ]] || die "missing the arguments of colddiff_jax.main, e.g. --config=configs/celeba_blur.py --workdir=/shared/runs/celeba_blur"
for arg in "$@"; do
  case "$arg" in
    --coordinator_address*|--num_processes*|--process_id*)
      die "do not pass $arg: it comes from COORDINATOR, NUM_NODES and NODE_RANK." ;;
  esac
done

# Configs are given relative to the checkout (--config=configs/...).
cd "$REPO_ROOT"
# exec: SIGTERM from a scheduler reaches Python, which saves a checkpoint.
run_exec "${PYTHON:-python3}" -m colddiff_jax.main \
  --coordinator_address="$COORDINATOR" --num_processes="$NUM_NODES" \
  --process_id="$NODE_RANK" "$@"
