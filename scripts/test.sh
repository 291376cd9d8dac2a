#!/usr/bin/env bash
# The test command: set up the environment, lint, then run the whole test suite (CPU only, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
ruff check .
python -m pytest tests "$@"
