#!/usr/bin/env bash
# Thin wrapper: pick the launcher from the number of processes and pass everything else through.
#   launch/train.sh 1 --config my.yaml                 # plain python, one process
#   launch/train.sh 2 simplex.vertices=4               # 2 processes on this machine, ZeRO-3 (GPUs, or CPUs over gloo)
#   NPROC=8 launch/train.sh 8 --config my.yaml         # one node, 8 GPUs
# Multi-node: see launch/slurm.sh. DS_CONFIG picks the DeepSpeed JSON (default zero3_bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] && . .venv/bin/activate
nproc=${1:?usage: launch/train.sh NUM_PROCESSES [--config FILE] [key=value ...]}
shift
if [[ "$nproc" == 1 ]]; then
  exec python -m dist_subspace.train "$@"
fi
exec torchrun --standalone --nproc_per_node "$nproc" -m dist_subspace.train \
  engine.deepspeed="${DS_CONFIG:-zero3_bf16}" "$@"
