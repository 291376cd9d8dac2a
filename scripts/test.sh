#!/usr/bin/env bash
# The test command: set up the environment, lint, then run the whole test suite (CPU only, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
ruff check .
# Two workers (pytest-xdist), one test file each at a time, so module fixtures are built once: most tests are
# compile- or subprocess-bound on one core, so two share a 2-core machine well. CAFT_TEST_WORKERS=0 runs serially.
python -m pytest tests -n "${CAFT_TEST_WORKERS:-2}" --dist loadfile "$@"
