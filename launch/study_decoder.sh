#!/usr/bin/env bash
# Why does K = 3 not beat K = 1 on the decoder (issue 18, section 3)? SmolLM2-135M, Rotten Tomatoes, 5 seeds, one
# thread. Each step is a study of its own (same spec file, other methods, budget or P); finished units are kept.
# Usage: bash launch/study_decoder.sh   (about 3-4 hours on one CPU core in bf16)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
spec=configs/study_decoder.yaml
base='model.dtype: bfloat16, data.shots_per_class: 16, data.test_size: 500, model.max_length: 128, train.micro_batch_size: 8, train.log_every: 5, train.eval_batch_size: 64, eval.landscape: true, eval.landscape_resolution: 4'
# 1. the learning rate on dev, the centred regulariser, the sampled dev metric, selection against the last step
"$PY" -m dist_subspace.study "$spec" --table
# 2. the regulariser's weight, beta = 0 and 10, beside K = 1 (kept from step 1)
"$PY" -m dist_subspace.study "$spec" 'methods=[k1,k3,k3_beta0,k3_beta10]' 'lrs=[0.01]' --table
# 3. a longer prefix, P = 16
"$PY" -m dist_subspace.study "$spec" output_dir=runs/decoder_p16 'methods=[k1,k3]' 'lrs=[0.01]' \
  "base={$base, prefix.length: 16, train.max_steps: 40, train.eval_every: 5, train.save_every: 10}" --table
# 4. a longer budget, 100 steps
"$PY" -m dist_subspace.study "$spec" output_dir=runs/decoder_steps100 'methods=[k1,k1_last,k3,k3_last,k3_sampled]' \
  'lrs=[0.01]' "base={$base, train.max_steps: 100, train.eval_every: 10, train.save_every: 20}" --table
