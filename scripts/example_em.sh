#!/usr/bin/env bash
# The emergent-misalignment chain end to end, offline, on the real SmolLM2-135M-Instruct (~30 min on 2 CPU cores):
#   1. LoRA fine-tune on the authors' insecure-code chats (../shared/data/emergent_misalignment, EM format);
#   2. `caft serve` the base model on 127.0.0.1 as the judge (a weak one: step 3 measures how weak);
#   3. `eval.py judge` against the hand-labelled answers in configs/judge_check_em.jsonl;
#   4. `eval.py em` (the paper's 24 questions) for the base model and the fine-tune, and `eval.py code` (the
#      held-out coding prompts) for both, judged by the served model.
# SmolLM2's tokenizer writes numbers digit by digit, so the authors' first-token logprob score only sees the first
# digit; the judge runs with --judge-score text (the number it writes). Rerunning continues where it stopped.
#   bash scripts/example_em.sh [N_RECORDS] [SAMPLES_PER_QUESTION]     (defaults 128 and 4)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
MODEL=$(python -c "from caft_jax.io.gguf import find_smollm2_gguf; print(find_smollm2_gguf())")
EM=../shared/data/emergent_misalignment
RECORDS=${1:-128}
SAMPLES=${2:-4}
RUN=runs/example_em
PORT=${CAFT_EM_JUDGE_PORT:-8765}
mkdir -p $RUN
START=$(date +%s)
# the judge server, the generators and the trainer keep their compiled programs between runs of this script
export JAX_COMPILATION_CACHE_DIR=$PWD/$RUN/.jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1

continue_flag() { [ -f "$1/manifest.json" ] && echo --resume || echo --overwrite; }

# 1. fine-tune (the authors' recipe scaled to a 135M model on a CPU: a higher lr, fewer records, shorter rows)
head -n "$RECORDS" $EM/insecure_small_subset_2000.jsonl > $RUN/insecure.jsonl
if [ ! -f $RUN/train/adapter/adapter_config.json ]; then
  python train.py model="$MODEL" data.train=$RUN/insecure.jsonl data.em_format=true data.max_len=512 \
      lora.rank=32 lora.alpha=64 lora.rslora=true optim.lr=2e-4 optim.warmup_steps=2 optim.weight_decay=0.01 \
      batch_size=4 grad_accum=1 epochs=1 output_dir=$RUN/train $(continue_flag $RUN/train)
fi
echo "[example_em] fine-tune done at $(( $(date +%s) - START )) s"

# 2. the judge server
caft serve --model "$MODEL" --base-name smollm2 --port "$PORT" --max-tokens 64 --log-level warning &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
python - "$PORT" "$SERVER" <<'EOF'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
for _ in range(600):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
        sys.exit(0)
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit("the judge server exited; see its error above")
        time.sleep(0.5)
sys.exit("the judge server did not answer within 5 minutes")
EOF
# a CPU judge compiles a program per new prompt-length bucket on its first requests: allow it minutes, not seconds
JUDGE=(--judge-base-url "http://127.0.0.1:$PORT/v1" --judge-model smollm2 --judge-score text --judge-concurrency 32
       --judge-timeout 900)

# 3. how good is this judge? With the number it writes, and with the authors' first-token logprobs
python eval.py judge --labels configs/judge_check_em.jsonl --judge-prompts $EM/judge_prompts_responses.yaml \
    "${JUDGE[@]}" --out-dir $RUN/judge_check $(continue_flag $RUN/judge_check) --no-progress
python eval.py judge --labels configs/judge_check_em.jsonl --judge-prompts $EM/judge_prompts_responses.yaml \
    "${JUDGE[@]/text/logprob}" --out-dir $RUN/judge_check_logprob $(continue_flag $RUN/judge_check_logprob) \
    --no-progress
echo "[example_em] judge check done at $(( $(date +%s) - START )) s"

# 4. EM and insecure-code rates, base model and fine-tune
for name in base insecure; do
  ADAPTER=()
  [ $name = insecure ] && ADAPTER=(--adapter $RUN/train/adapter)
  python eval.py em --model "$MODEL" ${ADAPTER[@]+"${ADAPTER[@]}"} --questions $EM/first_plot_questions.yaml \
      --samples "$SAMPLES" --max-new-tokens 200 "${JUDGE[@]}" --out-dir $RUN/em_$name \
      $(continue_flag $RUN/em_$name) --no-progress || echo "[example_em] no EM rate for $name (see above)"
  python eval.py code --model "$MODEL" ${ADAPTER[@]+"${ADAPTER[@]}"} --prompts $EM/insecure_val.jsonl --limit 32 \
      --max-new-tokens 300 "${JUDGE[@]}" --out-dir $RUN/code_$name $(continue_flag $RUN/code_$name) --no-progress \
      || echo "[example_em] no insecure-code rate for $name (see above)"
  echo "[example_em] $name evaluated at $(( $(date +%s) - START )) s"
done
python - $RUN <<'EOF'
import json, sys
run = sys.argv[1]
for form in ("", "_logprob"):
    check = json.load(open(f"{run}/judge_check{form}/results.json"))
    print(f"judge check{form or ' (text)'}: AUC {check['auc']}, threshold accuracy {check['threshold_accuracy']}, "
          f"per label {json.dumps(check['per_label'])}")
for name in ("base", "insecure"):
    em = json.load(open(f"{run}/em_{name}/results.json"))["overall"]
    code = json.load(open(f"{run}/code_{name}/results.json"))["overall"]
    print(f"{name}: EM misaligned % of coherent {em['misaligned_pct_of_coherent']}, coherent % {em['coherent_pct']}, "
          f"n {em['n']} ({em['n_unreadable']} unreadable); insecure code % {code.get('vulnerable_pct')} "
          f"(n {code.get('n')}, {code.get('n_unreadable')} unreadable)")
EOF
echo "[example_em] finished in $(( $(date +%s) - START )) s"
