#!/usr/bin/env bash
# The paper's gender-bias task on Gemma-2-2B, full fine-tuning (caft_method.md 1.5(b), 2.2, 3.3): base model, then
# plain / CAFT / random-direction fine-tunes x 5 seeds, OOD accuracy on the pronoun case. Settings:
# configs/pipeline_gender_gemma2_2b.yaml; extra pipeline flags are passed on (e.g. --model DIR --seeds 3, or after
# reading the displays --selection-file human=picked.json --conditions plain,caft,random,caft@top5,caft@human,
# which reuses the finished runs). Results: runs/gender_gemma2_2b/results.md/.csv/.png;
# rerunning continues runs/gender_gemma2_2b (--resume is added when it holds a run and no --overwrite or --out is
# given). PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
resume=()
[[ -f runs/gender_gemma2_2b/manifest.json && " $* " != *" --overwrite "* && " $* " != *" --out "* && " $* " != *" --resume "* ]] &&
    resume=(--resume)
"${PYTHON:-python}" -m caft_jax.pipeline --config configs/pipeline_gender_gemma2_2b.yaml ${resume[@]+"${resume[@]}"} "$@"
