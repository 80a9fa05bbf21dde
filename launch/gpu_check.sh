#!/usr/bin/env bash
# The one-GPU check (an H100 or H200, under 8 minutes): k3 against the frozen-backbone limit and PEFT in bf16 on a
# 1.24B Llama-shaped model built from a config (no download) at sequence lengths 512 and 2048, CUDA-graph capture
# of sampler + mixer, host syncs inside a training step, the SDPA backend with a prefix, the fullgraph compile,
# and the attention kernels behind a prefix on two Llama-3-8B-shaped layers at 512, 2,048 and 8,192 tokens.
# One JSON file; see dist_subspace/gpu_check.py. Needs torch, transformers and peft (not deepspeed or datasets).
#
#   bash launch/gpu_check.sh [OUT_FILE]             default: $OUT/gpu_check.json, else ./gpu_check.json
#   bash launch/gpu_check.sh --dry-run [OUT_FILE]   tiny model on the CPU, seconds: checks the script only
set -euo pipefail
cd "$(dirname "$0")/.."
dry=()
if [[ "${1:-}" == "--dry-run" ]]; then dry=(--dry-run); shift; fi
out="${1:-${OUT:+$OUT/}gpu_check.json}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=$(command -v python3 || command -v python); fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# Well inside the 8 minutes; the JSON is rewritten after every part, so a cut run keeps what it measured.
timeout 450 "$python" -m benchmarks.gpu_check "${dry[@]}" --out "$out"
