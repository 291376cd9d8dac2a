#!/usr/bin/env bash
# Worked example of direction discovery on the real SmolLM2-135M-Instruct (no network; ~5 min on 2 CPU cores):
# a short LoRA fine-tune on insecure-code chats, PCA of its activation differences from the base model,
# feature displays, and ablation specs from a hand-written selection and from the top-k baseline.
# Uses the authors' data in ../shared/data (pass another chat JSONL as $1 to use your own).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
MODEL=$(python -c "from caft_jax.io.gguf import find_smollm2_gguf; print(find_smollm2_gguf())")
DATA=${1:-../shared/data/emergent_misalignment/insecure_small_subset_2000.jsonl}
RUN=runs/example_discovery
mkdir -p $RUN
# One JSON string per corpus line: a .txt corpus would need blank lines between documents.
head -n 64 "$DATA" > $RUN/chats.jsonl
python -c "
import json
for line in open('$RUN/chats.jsonl'):
    print(json.dumps(json.loads(line)['messages'][0]['content'][:400]))
" > $RUN/corpus.jsonl
python train.py model="$MODEL" data.train=$RUN/chats.jsonl data.max_len=512 lora.rank=8 lora.alpha=16 \
    batch_size=4 grad_accum=1 max_steps=12 optim.lr=2e-4 optim.warmup_steps=2 output_dir=$RUN/train --overwrite
python -m caft_jax.discover pca --model "$MODEL" --adapter $RUN/train/adapter --data $RUN/chats.jsonl \
    --layers 10,20 --n-components 8 --exclude-sink --max-len 512 --out-dir $RUN/discovery --overwrite
python -m caft_jax.discover display --model "$MODEL" --pca $RUN/discovery/pca.safetensors --corpus $RUN/corpus.jsonl \
    --layers 10 --n-features 4 --k 5 --out-dir $RUN/discovery --overwrite
echo '{"10": [0, 2], "20": [1]}' > $RUN/discovery/selection.json
python -m caft_jax.discover select --pca $RUN/discovery/pca.safetensors --selection $RUN/discovery/selection.json \
    --out-dir $RUN/discovery --overwrite
python -m caft_jax.discover select --pca $RUN/discovery/pca.safetensors --top-k 3 --name top3.safetensors \
    --out-dir $RUN/discovery --overwrite
echo "Open $RUN/discovery/displays.html; train with the spec: python train.py ... ablation.spec=$RUN/discovery/ablation_spec.safetensors"
