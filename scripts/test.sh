#!/usr/bin/env bash
# The test command: set up the environment, lint, then run the whole test suite (CPU only, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
ruff check .
# A headless Chromium renders the feature displays in tests/test_displays_select.py; where apt can install one
# (CI runs as root on Debian) it is installed, elsewhere that one test says it was skipped for want of a browser.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }) ||
    echo "caft_jax: could not install chromium; the display rendering test will be skipped"
fi
# Two workers (pytest-xdist), one test file each at a time, so module fixtures are built once: most tests are
# compile- or subprocess-bound on one core, so two share a 2-core machine well. CAFT_TEST_WORKERS=0 runs serially.
python -m pytest tests -n "${CAFT_TEST_WORKERS:-2}" --dist loadfile "$@"
