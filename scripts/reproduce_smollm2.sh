#!/usr/bin/env bash
# The paper's discovery route on the real SmolLM2-135M-Instruct, offline and resumable (rerun to continue; each
# step is skipped once its results exist, and pipeline runs resume run by run):
#   sae     BatchTopK SAEs on the residual stream at layers 9 and 18 (`discover train-sae`), trained on the task
#           texts (gender and MCMC prompts from the offline builders) and 128 insecure-code chats; quality report
#           (explained variance, L0, dead latents on held-out texts) in runs/smollm2/sae/sae_report.json
#   gender  the PCA route on the gender task: plain fine-tune, PCA of fine-tuned minus base activations (attention
#           sinks and massive dimensions left out), probe-guided selection, displays, CAFT and random directions,
#           3 seeds; then displays of the 5 top PCs per layer, an autointerp choice by SmolLM2 behind `caft serve`,
#           and in the same run folder CAFT with the top-5 PCs, with the person's choice
#           (configs/selections/smollm2_gender_human.json, made from this run's PCs) and with the LLM's
#   mcmc    plain / CAFT (probe-guided) / random / CAFT with the top-5 PCs on MCMC pairs of the offline
#           generators: sentiment|pronouns and verbs|pronouns with either question intended, 3 seeds, and
#           verbs|sentiment (sentiment intended), 1 seed; on sentiment|pronouns and verbs|pronouns (first question
#           intended) also the displays of the 5 top PCs per layer and CAFT with a person's choice from them
#           (configs/selections/smollm2_mcmc_*_human.json); on sentiment|pronouns the LLM's choice, the erasure of
#           the pronoun by each set (runs/smollm2/mcmc_sentiment_pronouns_0_pca/erasure) and CAFT with supervised
#           LEACE directions of the pronoun label (mcmc_sentiment_pronouns_0_concept); MCMC_SEEDS overrides the
#           seeds of every pair
#   sae_caft  CAFT with the top SAE latents of two rankings (attribution, mean difference) against random
#           directions, on gender and on sentiment|pronouns, SAE_SEEDS seeds (default 3)
#   compare the summary figure over the run folders (runs/smollm2/compare/compare.{md,png})
# Times on 2 CPU cores (AMD EPYC, 2 Dec 2026): a gender fine-tune of 64 steps ~3-5 min, the gender step ~75 min;
# sae ~40 min (the capture of ~100k tokens once, then 488 steps per layer); mcmc ~3.1 min per fine-tune (3 Dec),
# ~38 min per 3-seed pair; on sentiment|pronouns the displays ~2 min, autointerp ~30 min, the erasure sets ~16 min
# and the LEACE reference 6 fine-tunes (3 Dec, beside other runs).
#   bash scripts/reproduce_smollm2.sh [sae] [gender] [mcmc] [sae_caft] [compare]      (default: all five)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
MODEL=$(python -c "from caft_jax.io.gguf import find_smollm2_gguf; print(find_smollm2_gguf())")
OUT=runs/smollm2
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(sae gender mcmc sae_caft compare)
mkdir -p $OUT
START=$(date +%s)
took() { echo "[reproduce_smollm2] $1 done at $(( $(date +%s) - START )) s"; }
resume_flag() { [ -f "$1/manifest.json" ] && echo --resume || echo; }

# one text per line, prompt + answer letter, of a run's train items
train_texts() {
  [ -f $1/train_texts.jsonl ] || python -c \
      "import json,sys; [print(json.dumps(r['prompt'] + r['target'])) for r in map(json.loads, open(sys.argv[1]))]" \
      $1/task/train.jsonl > $1/train_texts.jsonl
}
# what a person reads to choose: the 5 top PCs at every discovery layer of a run, over its train items
human_displays() {
  train_texts $1
  [ -f $1/human_displays/displays.json ] || python -m caft_jax.discover display --model "$MODEL" \
      --pca $1/directions/pca.safetensors --corpus $1/train_texts.jsonl --n-features 5 --out-dir $1/human_displays \
      --overwrite
}
# an LLM's choice from the same displays: SmolLM2 itself behind `caft serve` (port $2) as explainer and scorer,
# asked for the concept $3; a failure is kept in autointerp/failed.txt and reported, not retried
autointerp() {
  local run=$1 port=$2 concept=$3
  [ -f $run/autointerp/spec_autointerp.safetensors ] || [ -f $run/autointerp/failed.txt ] && return
  python -m caft_jax.serve --model "$MODEL" --port $port > $run/serve.log 2>&1 &
  local server=$!
  trap "kill $server 2>/dev/null || true" EXIT
  mkdir -p $run/autointerp
  until python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/v1/models')" 2> /dev/null; do
    sleep 5
  done
  OPENAI_API_KEY=local python -m caft_jax.discover select --pca $run/directions/pca.safetensors \
      --displays $run/human_displays/displays.json --autointerp-base-url http://127.0.0.1:$port/v1 \
      --autointerp "$concept" --autointerp-model base --autointerp-score text --autointerp-timeout 1200 \
      --out-dir $run/autointerp --name spec_autointerp.safetensors --overwrite \
      2> >(tee $run/autointerp/stderr.txt >&2) || tail -1 $run/autointerp/stderr.txt > $run/autointerp/failed.txt
  kill $server 2>/dev/null || true
}
# how much of the spurious concept a set of directions holds: a linear probe for the spurious label on held-out
# items (val + test, pooled over real tokens, `discover check`) before and after removing the top-5 and all 20
# difference PCs per layer, the person's PCs, and, for reference, LEACE directions fitted to the label on the train
# items (`discover concept`); one erasure_check.json per set under $1/erasure
erasure_sets() {
  local run=$1 dir=$1/erasure
  [ -f $dir/check_leace/erasure_check.json ] && return
  mkdir -p $dir
  python - $run <<'PY'
import json, sys
run = sys.argv[1]
def write(name, splits):
    with open(f"{run}/erasure/labelled_{name}.jsonl", "w") as out:
        for split in splits:
            for line in open(f"{run}/task/{split}.jsonl"):
                item = json.loads(line)
                out.write(json.dumps({"prompt": item["prompt"] + item["target"], "label": item["spurious_label"]}) + "\n")
write("train", ["train"])
write("heldout", ["val", "test"])
PY
  for k in 5 20; do
    python -m caft_jax.discover select --pca $run/directions/pca.safetensors --top-k $k --out-dir $dir \
        --name spec_top$k.safetensors --overwrite
  done
  python -m caft_jax.discover concept --model "$MODEL" --labelled $dir/labelled_train.jsonl --layers 0,3,6,9,12,15,18,21,24,27 \
      --method leace --out-dir $dir/leace --overwrite
  for set in top5=$dir/spec_top5.safetensors top20=$dir/spec_top20.safetensors \
      human=$run/directions/spec_human.safetensors leace=$dir/leace/ablation_spec.safetensors; do
    python -m caft_jax.discover check --model "$MODEL" --spec ${set#*=} --labelled $dir/labelled_heldout.jsonl \
        --out-dir $dir/check_${set%%=*} --overwrite
  done
}
# the pipeline's --conditions and --selection-file for a run's conditions $2 plus the person's choice (file $3) and
# the LLM's (when autointerp kept any PC)
chosen_conditions() {
  local conditions=$2,caft@human files=human=$3
  if [ -f $1/autointerp/spec_autointerp.safetensors ]; then
    conditions=$conditions,caft@autointerp
    files=$files,autointerp=$1/autointerp/spec_autointerp.safetensors
  fi
  echo --conditions $conditions --selection-file $files
}

for step in "${STEPS[@]}"; do
  case $step in
  sae)
    if [ ! -f $OUT/sae/sae_report.json ]; then
      # one text per line: the task prompts with their answer letter, then chats as user + assistant text
      python - ../shared/data/emergent_misalignment/insecure_small_subset_2000.jsonl > $OUT/sae_corpus.jsonl <<'EOF'
import json, sys
from caft_jax.tasks import gender, mcmc
from caft_jax.tasks.generators import GENERATORS

texts = []
for split in gender.build_gender(gender.offline_templates()).values():
    texts += [it["prompt"] + it["target"] for it in split]
rows = {name: make(seed=0) for name, make in GENERATORS.items()}
for a, b in (("verbs", "sentiment"), ("sentiment", "pronouns"), ("verbs", "pronouns")):
    for split in mcmc.build_mcmc(rows[a], rows[b], 0, max_len=600).values():
        texts += [it["prompt"] + it["target"] for it in split]
with open(sys.argv[1]) as f:
    for line in list(f)[:128]:
        texts.append("\n".join(m["content"] for m in json.loads(line)["messages"]))
import random
random.Random(0).shuffle(texts)  # the first 10% are held out for the quality report
for t in texts:
    print(json.dumps(t))
EOF
      python -m caft_jax.discover train-sae --model "$MODEL" --corpus $OUT/sae_corpus.jsonl --layers 9,18 \
          --dict-size 4096 --k 32 --tokens 1000000 --batch-tokens 2048 --max-len 512 --batch-size 16 \
          --out-dir $OUT/sae --overwrite
    fi
    took sae
    ;;
  gender)
    run=$OUT/gender_pca
    python -m caft_jax.pipeline --task gender --directions pca --seeds 3 --out $run $(resume_flag $run)
    human_displays $run
    autointerp $run 8011 "the gender of a person: male or female professions and pronouns (doctor, nurse, he, she), not the grammatical case of the pronoun"
    # the same run folder, with the top-PCs baseline and the person's and the LLM's choices (plain runs reused)
    python -m caft_jax.pipeline --task gender --directions pca --seeds 3 --out $run --resume \
        $(chosen_conditions $run plain,caft,random,caft@top5 configs/selections/smollm2_gender_human.json)
    took gender
    ;;
  mcmc)
    # "a b intended seeds conditions": verbs|sentiment gets one seed (its plain fine-tune does not fit on this
    # recipe); on verbs|pronouns the probe rule keeps no PC either way (best AUC 0.676 and 0.694 against the 0.7
    # threshold), so there the top-5 PCs and random directions of their count stand in for it
    probe=plain,caft,random,caft@top5 top5=plain,caft@top5,random@top5
    for combo in "sentiment pronouns 0 3 $probe" "sentiment pronouns 1 3 $probe" \
        "verbs pronouns 0 3 $top5" "verbs pronouns 1 3 $top5" "verbs sentiment 1 1 $probe"; do
      read -r a b intended seeds conditions <<< "$combo"
      run=$OUT/mcmc_${a}_${b}_${intended}_pca
      python -m caft_jax.pipeline --task mcmc --a $a --b $b --intended $intended --directions pca \
          --seeds "${MCMC_SEEDS:-$seeds}" --conditions $conditions --out $run $(resume_flag $run)
      # the person's choice, where one was made from this run's human_displays, in the same run folder; on
      # sentiment|pronouns (sentiment intended) also the LLM's, the erasure of the pronoun by each set of
      # directions, and the supervised reference: CAFT with LEACE directions of the pronoun label
      human=configs/selections/smollm2_mcmc_${a}_${b}_${intended}_human.json
      studied=$([ "$a $b $intended" = "sentiment pronouns 0" ] && echo yes || echo no)
      if [ -f $human ]; then
        human_displays $run
        if [ $studied = yes ]; then
          autointerp $run 8012 "personal pronouns (he, she, they, him, her, them) and which of them fills the blank in a sentence about a person, not the sentiment of a sentence"
        fi
        python -m caft_jax.pipeline --task mcmc --a $a --b $b --intended $intended --directions pca \
            --seeds "${MCMC_SEEDS:-$seeds}" --out $run --resume $(chosen_conditions $run $conditions $human)
      fi
      if [ $studied = yes ]; then
        erasure_sets $run
        concept=${run%_pca}_concept
        python -m caft_jax.pipeline --task mcmc --a $a --b $b --intended $intended --directions concept \
            --seeds "${MCMC_SEEDS:-$seeds}" --conditions plain,caft --out $concept $(resume_flag $concept)
      fi
      took "mcmc $a|$b intended $intended"
    done
    ;;
  sae_caft)
    # CAFT with SAE latents' decoder directions (layers 9 and 18 of the sae step): a plain seed-0 fine-tune
    # (--keep-plain keeps it in directions/plain_model), two rankings of the latents over the task's train items,
    # attribution of logit(intended) - logit(other) on the base model (the authors' spurious-task ranking) and the
    # mean latent difference fine-tuned minus base over all real tokens, then CAFT with each ranking's top 5
    # latents per layer and the random baseline with as many directions
    sae="--sae 9=$OUT/sae/layer_9 --sae 18=$OUT/sae/layer_18"
    for combo in "gender" "mcmc sentiment pronouns 0"; do
      read -r task a b intended <<< "$combo"
      if [ "$task" = gender ]; then task_args=(--task gender); run=$OUT/gender_sae
      else task_args=(--task mcmc --a "$a" --b "$b" --intended "$intended"); run=$OUT/mcmc_${a}_${b}_${intended}_sae; fi
      python -m caft_jax.pipeline "${task_args[@]}" --directions pca --seeds 1 --conditions plain --keep-plain --out $run \
          $(resume_flag $run)
      common=(--model "$MODEL" $sae --data $run/task/train.jsonl --format mc --limit 256 --top-k 100)
      [ -f $run/sae_attribution/sae_ranking.json ] || python -m caft_jax.discover sae "${common[@]}" \
          --ranking attribution --metric logit_diff --out-dir $run/sae_attribution --overwrite
      [ -f $run/sae_mean_diff/sae_ranking.json ] || python -m caft_jax.discover sae "${common[@]}" \
          --ranking mean_diff --tuned $run/directions/plain_model --mask nonpad --exclude-sink \
          --out-dir $run/sae_mean_diff --overwrite
      train_texts $run
      for ranking in attribution mean_diff; do
        [ -f $run/sae_$ranking/spec_top5.safetensors ] || python -m caft_jax.discover select $sae \
            --ranking $run/sae_$ranking/sae_ranking.json --top-k 5 --out-dir $run/sae_$ranking \
            --name spec_top5.safetensors
        # what the chosen latents read: the ranking's first 5 per layer over the train items
        [ -f $run/sae_$ranking/displays.json ] || python -m caft_jax.discover display --model "$MODEL" $sae \
            --ranking $run/sae_$ranking/sae_ranking.json --corpus $run/train_texts.jsonl --n-features 5 --k 10 \
            --out-dir $run/sae_$ranking --overwrite
      done
      python -m caft_jax.pipeline "${task_args[@]}" --directions pca --seeds "${SAE_SEEDS:-3}" --out $run --resume \
          --conditions plain,caft@saeattr,caft@saediff,random@saediff \
          --selection-file saeattr=$run/sae_attribution/spec_top5.safetensors,saediff=$run/sae_mean_diff/spec_top5.safetensors
      took "sae_caft $combo"
    done
    ;;
  compare)
    python -m caft_jax.pipeline.compare $(ls -d $OUT/gender_pca $OUT/mcmc_*_pca $OUT/gender_sae $OUT/mcmc_*_sae 2>/dev/null) --out $OUT/compare
    took compare
    ;;
  *)
    echo "unknown step $step; use sae, gender, mcmc, sae_caft or compare" >&2
    exit 2
    ;;
  esac
done
