#!/usr/bin/env bash
# The paper's discovery route on the real SmolLM2-135M-Instruct, offline and resumable (rerun to continue; each
# step is skipped once its results exist, and pipeline runs resume run by run):
#   sae     BatchTopK SAEs on the residual stream at layers 9 and 18 (`discover train-sae`), trained on the task
#           texts (gender and MCMC prompts from the offline builders) and 128 insecure-code chats; quality report
#           (explained variance, L0, dead latents on held-out texts) in runs/smollm2/sae/sae_report.json
#   gender  the PCA route on the gender task: plain fine-tune, PCA of fine-tuned minus base activations (attention
#           sinks left out), probe-guided selection, displays, CAFT and random directions, 3 seeds
#   mcmc    the same on four MCMC pairs of the offline generators: verbs|sentiment with either question intended,
#           sentiment|pronouns and verbs|pronouns
# Times on 2 CPU cores: sae ~40 min (the capture of ~100k tokens once, then 488 steps per layer); each pipeline
# ~40 min (9 fine-tunes of 32 steps and one discovery).
#   bash scripts/reproduce_smollm2.sh [sae] [gender] [mcmc]      (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
MODEL=$(python -c "from caft_jax.io.gguf import find_smollm2_gguf; print(find_smollm2_gguf())")
OUT=runs/smollm2
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(sae gender mcmc)
mkdir -p $OUT
START=$(date +%s)
took() { echo "[reproduce_smollm2] $1 done at $(( $(date +%s) - START )) s"; }
resume_flag() { [ -f "$1/manifest.json" ] && echo --resume || echo; }

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
    python -m caft_jax.pipeline --task gender --directions pca --seeds 3 --out $OUT/gender_pca \
        $(resume_flag $OUT/gender_pca)
    took gender
    ;;
  mcmc)
    for combo in "verbs sentiment 1" "verbs sentiment 0" "sentiment pronouns 0" "verbs pronouns 0"; do
      read -r a b intended <<< "$combo"
      run=$OUT/mcmc_${a}_${b}_${intended}_pca
      python -m caft_jax.pipeline --task mcmc --a $a --b $b --intended $intended --directions pca --seeds 3 \
          --out $run $(resume_flag $run)
      took "mcmc $a|$b intended $intended"
    done
    ;;
  *)
    echo "unknown step $step; use sae, gender or mcmc" >&2
    exit 2
    ;;
  esac
done
