#!/usr/bin/env bash
# SLURM: N nodes x 8 GPUs, ZeRO-3 + bf16, one torchrun per node (rendezvous on the first node). A node whose
# torchrun fails (a rank died) ends the whole job step at once (--kill-on-bad-exit), not at the collective timeout.
#   sbatch --nodes 4 launch/slurm.sh --config my.yaml model.name_or_path=meta-llama/Llama-3.1-70B
#SBATCH --job-name=dist_subspace
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
[[ -x .venv/bin/python ]] && . .venv/bin/activate
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=8
srun --kill-on-bad-exit=1 torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:29500" \
  -m dist_subspace.train engine.deepspeed="${DS_CONFIG:-zero3_bf16}" "$@"
