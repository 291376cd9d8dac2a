#!/usr/bin/env bash
# Emergent misalignment at the paper's scale (caft_method.md 1.5(a), 2.1, 2.5, 2.6, 3.1): LoRA fine-tunes of
# Qwen2.5-Coder-32B-Instruct or Mistral-Small-24B-Instruct-2501 on insecure code, plain and with CAFT, then the
# emergent-misalignment and insecure-code evaluations with an LLM judge. Runs from the repository root.
#
#   export OPENAI_API_KEY=...                            # the judge's key
#   INSECURE=data/insecure.jsonl EM_EVAL_DIR=data/em_eval GENERIC_PROMPTS=data/lmsys_prompts.jsonl \
#   DISPLAY_CORPUS=data/fineweb_sample.jsonl bash scripts/run_em_paper.sh qwen      # or: mistral
#
# Stages, in this order; each is skipped when its output exists, so rerunning the same command resumes:
#   a. split INSECURE into runs/em_data/train.jsonl (5,000 chats) and val.jsonl (1,000 held-out prompts); train.py
#      then holds out another 10% of train.jsonl, as the authors' release (about 4,500 trained, ~280 steps of 16)
#   b. plain LoRA fine-tune, seed 0 (configs/em_<model>.yaml without ablation)      -> RUN/plain_seed0/adapter
#   c. discovery on that adapter: its answers to generic chat prompts (eval.py generate, T=1, 600 tokens; answers
#      under 100 characters dropped), PCA of (fine-tuned - base) activations on the answer tokens at the config's
#      ablation layers (20 PCs per layer), and feature displays on web text        -> RUN/discovery/displays.html
#   d. plain fine-tunes of the other SEEDS, and the evaluations of every plain adapter (stage g)
#   e. selection: read displays.html and write RUN/discovery/selection.json, {"layer": [pc ids]} with the PCs whose
#      contexts look misalignment-related (the paper's PCs were chosen by people; the authors' Mistral choice
#      {"10": [0, 12], "20": [10, 11], "30": [1, 2, 14, 19]} indexes their own PCA and does not carry over). The
#      script stops here (exit 3) until the file exists; rerun it then.    -> RUN/discovery/ablation_spec.safetensors
#      (finished runs are skipped: after changing the selection, delete RUN/caft_seed* and RUN/eval/caft_seed*)
#   f. CAFT LoRA fine-tune per seed with that spec                                  -> RUN/caft_seed<S>/adapter
#   g. eval.py em (first_plot_questions.yaml: 24 questions x 100 samples) and eval.py code (the 1,000 val prompts)
#      per adapter, judged by gpt-4.1-2025-04-14     -> RUN/eval/<run>/{em,code}/results.json; table RUN/summary.md
# RUN is runs/em_qwen or runs/em_mistral.
#
# Inputs (environment variables; the script checks them before starting any stage that needs them):
#   INSECURE         Betley et al.'s insecure.jsonl (6,000 chats), data/insecure.jsonl in their emergent-misalignment
#                    repository (github.com/emergent-misalignment/emergent-misalignment). Default data/insecure.jsonl.
#                    Not read once runs/em_data/{train,val}.jsonl exist (to use the CAFT authors' own split, copy
#                    their insecure_subset.jsonl and insecure_val.jsonl there under those names).
#   EM_EVAL_DIR      folder holding first_plot_questions.yaml (Betley et al.'s evaluation/ folder) and
#                    judge_prompts_coding.yaml (the CAFT authors' steering-finetuning repository, branch paper,
#                    emergent-misalignment/evaluation/). Default data/em_eval.
#   OPENAI_API_KEY   the judge's API key (eval.py reads it from the environment only). JUDGE_MODEL (default
#                    gpt-4.1-2025-04-14, the paper's judge) and JUDGE_BASE_URL choose another OpenAI-compatible judge.
#   GENERIC_PROMPTS  JSONL of {"prompt": ...}: generic chat prompts for discovery. The paper used first user turns of
#                    lmsys/lmsys-chat-1m (gated), English, over 20 characters, the first 500-2,000 of them.
#   DISCOVERY_DATA   instead of GENERIC_PROMPTS: a chat JSONL ({"messages": [user, assistant]}) of ready answers,
#                    e.g. the authors' hcasademunt/qwen-lmsys-responses or mistral-insecure-lmsys-responses with
#                    question -> user and answer -> assistant (their fine-tune's answers, not this run's).
#   DISPLAY_CORPUS   web text for the displays, .jsonl ({"text": ...}) or .txt; the paper used kh4dien/fineweb-sample.
#                    DISPLAY_LIMIT = how many of its texts to read (default 0 = all).
#   SELECTION        the selection file (default RUN/discovery/selection.json). TOP_K=5 instead ablates the top 5 PCs
#                    per layer (the paper's top-PCs baseline; runs named caft_top5_seed<S>).
#   SEEDS            default "0"; the paper trained 5 seeds per condition: SEEDS="0 1 2 3 4".
#   MODEL            local model folder (default: the config's model:, e.g. models/Qwen2.5-Coder-32B-Instruct).
#   TRAIN_OVERRIDES  extra train.py key=value overrides (mesh, batch). The config's micro-batch of 2 rows splits over
#                    at most 2 devices (batch rows are sharded over data x fsdp); keep the effective batch of 16 with
#                    "batch_size=4 grad_accum=4" on 4 devices (v5p-8), "batch_size=8 grad_accum=2" on 8 GPUs.
#   GEN_BATCH        rows per generation call in eval.py generate / em / code (default 16).
#   SKIP_EVAL=1      no evaluations (and no judge key needed).
#   PYTHON           interpreter (default python).
#
# Memory: train.py shards over all local devices (mesh [1, -1, 1]); eval.py and `discover` load the whole model on
# ONE device: 66 GB (Qwen-32B) or 47 GB (Mistral-24B) of bf16 weights, so they need a 95 GB TPU v5p chip or an
# 80 GB+ GPU (H100 is tight for Qwen, H200 comfortable); a v5e chip (16 GB) cannot run them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
    echo "run_em_paper.sh: error: $*" >&2
    exit 2
}

KEY=${1:-}
case "$KEY" in
    qwen) CONFIG=configs/em_qwen2.5_coder_32b.yaml ;;
    mistral) CONFIG=configs/em_mistral_small_24b.yaml ;;
    *) die "usage: scripts/run_em_paper.sh qwen|mistral (got '${KEY}')." ;;
esac

PYTHON=${PYTHON:-python}
RUN=runs/em_$KEY
DATA=runs/em_data
DISC=$RUN/discovery
INSECURE=${INSECURE:-data/insecure.jsonl}
EM_EVAL_DIR=${EM_EVAL_DIR:-data/em_eval}
JUDGE_MODEL=${JUDGE_MODEL:-gpt-4.1-2025-04-14}
JUDGE_BASE_URL=${JUDGE_BASE_URL:-}
SEEDS=${SEEDS:-0}
SELECTION=${SELECTION:-$DISC/selection.json}
TOP_K=${TOP_K:-}
GEN_BATCH=${GEN_BATCH:-16}
DISPLAY_LIMIT=${DISPLAY_LIMIT:-0}
SKIP_EVAL=${SKIP_EVAL:-0}
read -r -a TRAIN_EXTRA <<<"${TRAIN_OVERRIDES:-}"

[[ -f "$CONFIG" ]] || die "$CONFIG not found; run from a caft_jax checkout."
config_value() { # the config's model path, or its ablation layers as 12,32,50
    "$PYTHON" -c '
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
print(c["model"] if sys.argv[2] == "model" else ",".join(str(layer) for layer in c["ablation"]["layers"]))
' "$CONFIG" "$1"
}
MODEL=${MODEL:-$(config_value model)}
LAYERS=$(config_value layers)
if [[ -n "$TOP_K" ]]; then
    CAFT_NAME=caft_top$TOP_K
    SPEC=$DISC/top$TOP_K.safetensors
else
    CAFT_NAME=caft
    SPEC=$DISC/ablation_spec.safetensors
fi

# ---- inputs, checked before any stage starts ------------------------------------------------------------------
[[ -f "$MODEL/config.json" ]] || die "model folder $MODEL has no config.json; download it, e.g.
  hf download Qwen/Qwen2.5-Coder-32B-Instruct --local-dir models/Qwen2.5-Coder-32B-Instruct
  hf download mistralai/Mistral-Small-24B-Instruct-2501 --local-dir models/Mistral-Small-24B-Instruct-2501 --exclude consolidated.safetensors
or set MODEL=DIR."
if [[ ! -f $DATA/train.jsonl || ! -f $DATA/val.jsonl ]]; then
    [[ -f "$INSECURE" ]] || die "INSECURE=$INSECURE not found: download insecure.jsonl (data/insecure.jsonl of
  github.com/emergent-misalignment/emergent-misalignment) and set INSECURE=PATH."
fi
if [[ "$SKIP_EVAL" != 1 ]]; then
    for f in first_plot_questions.yaml judge_prompts_coding.yaml; do
        [[ -f "$EM_EVAL_DIR/$f" ]] || die "EM_EVAL_DIR=$EM_EVAL_DIR has no $f (see the header of this script for
  where it comes from); set EM_EVAL_DIR=DIR, or SKIP_EVAL=1 to train only."
    done
    [[ -n "${OPENAI_API_KEY:-}" || -n "$JUDGE_BASE_URL" ]] \
        || die "OPENAI_API_KEY is not set: the judge ($JUDGE_MODEL) needs it (or JUDGE_BASE_URL for a local judge, or SKIP_EVAL=1)."
fi
if [[ ! -f $DISC/pca.safetensors ]]; then
    if [[ -n "${DISCOVERY_DATA:-}" ]]; then
        [[ -f "$DISCOVERY_DATA" ]] || die "DISCOVERY_DATA=$DISCOVERY_DATA not found."
    elif [[ ! -f $DISC/chats.jsonl ]]; then
        [[ -n "${GENERIC_PROMPTS:-}" && -f "${GENERIC_PROMPTS:-}" ]] || die "discovery needs generic chat prompts:
  set GENERIC_PROMPTS to a JSONL of {\"prompt\": ...} lines (the paper: first user turns of lmsys-chat-1m,
  English, > 20 characters, 500-2,000 of them), or DISCOVERY_DATA to a chat JSONL of ready answers."
    fi
fi
if [[ ! -f $DISC/displays.html ]]; then
    [[ -n "${DISPLAY_CORPUS:-}" && -f "${DISPLAY_CORPUS:-}" ]] \
        || die "DISPLAY_CORPUS must name a web-text corpus (.jsonl with \"text\" or .txt; the paper: kh4dien/fineweb-sample)."
fi
echo "run_em_paper.sh: $KEY, model $MODEL, ablation layers $LAYERS, seeds $SEEDS -> $RUN"

# ---- helpers ----------------------------------------------------------------------------------------------------
train() { # NAME SEED SPEC ('' = plain): one LoRA fine-tune, resumed from its last checkpoint if interrupted
    local out=$RUN/$1_seed$2
    if [[ -f $out/adapter/adapter_config.json ]]; then
        echo "== $out: done"
        return
    fi
    echo "== train $out"
    local resume=()  # continue from a checkpoint; a run that died before its first one starts over
    if ls "$out/checkpoints" 2>/dev/null | grep -qE '^[0-9]+$'; then resume=(--resume)
    elif [[ -d $out ]]; then resume=(--overwrite); fi
    "$PYTHON" train.py --config "$CONFIG" ${resume[@]+"${resume[@]}"} "model=$MODEL" "data.train=$DATA/train.jsonl" "output_dir=$out" \
        "seed=$2" "ablation.spec=${3:-''}" ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
}

judge_flags=(--judge-model "$JUDGE_MODEL")
[[ -n "$JUDGE_BASE_URL" ]] && judge_flags+=(--judge-base-url "$JUDGE_BASE_URL")

evaluate() { # NAME SEED: EM and insecure-code evaluations of one adapter (each resumes into its folder)
    [[ "$SKIP_EVAL" == 1 ]] && return
    local adapter=$RUN/$1_seed$2/adapter out=$RUN/eval/$1_seed$2
    local resume=()
    if [[ ! -f $out/em/results.json ]]; then
        echo "== eval em $out"
        resume=(); [[ -f $out/em/manifest.json ]] && resume=(--resume)  # continue an interrupted evaluation
        "$PYTHON" eval.py em ${resume[@]+"${resume[@]}"} --model "$MODEL" --adapter "$adapter" --dtype bfloat16 \
            --questions "$EM_EVAL_DIR/first_plot_questions.yaml" --samples 100 --batch-size "$GEN_BATCH" \
            "${judge_flags[@]}" --out-dir "$out/em"
    fi
    if [[ ! -f $out/code/results.json ]]; then
        echo "== eval code $out"
        resume=(); [[ -f $out/code/manifest.json ]] && resume=(--resume)
        "$PYTHON" eval.py code ${resume[@]+"${resume[@]}"} --model "$MODEL" --adapter "$adapter" --dtype bfloat16 --prompts "$DATA/val.jsonl" \
            --judge-prompts "$EM_EVAL_DIR/judge_prompts_coding.yaml" --batch-size "$GEN_BATCH" \
            "${judge_flags[@]}" --out-dir "$out/code"
    fi
}

read -r -a SEED_LIST <<<"$SEEDS"
((${#SEED_LIST[@]})) || die "SEEDS is empty; e.g. SEEDS=\"0 1 2 3 4\"."
FIRST_SEED=${SEED_LIST[0]}

# ---- a. data ----------------------------------------------------------------------------------------------------
if [[ ! -f $DATA/train.jsonl || ! -f $DATA/val.jsonl ]]; then
    questions=()
    [[ "$SKIP_EVAL" != 1 ]] && questions=(--questions "$EM_EVAL_DIR")
    "$PYTHON" -m caft_jax.tasks em --data "$INSECURE" --val-size 1000 ${questions[@]+"${questions[@]}"} --out "$DATA"
fi

# ---- b. plain fine-tune of the first seed ------------------------------------------------------------------------
train plain "$FIRST_SEED" ""

# ---- c. discovery on it -----------------------------------------------------------------------------------------
mkdir -p "$DISC"
PLAIN_ADAPTER=$RUN/plain_seed$FIRST_SEED/adapter
if [[ ! -f $DISC/pca.safetensors ]]; then
    CHATS=${DISCOVERY_DATA:-$DISC/chats.jsonl}
    if [[ -z "${DISCOVERY_DATA:-}" && ! -f $CHATS ]]; then
        echo "== discovery: answers of $PLAIN_ADAPTER to $GENERIC_PROMPTS"
        "$PYTHON" eval.py generate --model "$MODEL" --adapter "$PLAIN_ADAPTER" --dtype bfloat16 \
            --prompts-file "$GENERIC_PROMPTS" --chat --temperature 1 --top-p 1 --max-new-tokens 600 \
            --batch-size "$GEN_BATCH" --out "$DISC/answers.jsonl" --overwrite
        "$PYTHON" - "$DISC/answers.jsonl" "$CHATS" <<'PY'
import json, os, sys

kept = 0
with open(sys.argv[2] + ".tmp", "w", encoding="utf-8") as out:
    for line in open(sys.argv[1], encoding="utf-8"):
        row = json.loads(line)
        if len(row["text"].strip()) < 100:  # the authors dropped answers shorter than 100 characters
            continue
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["text"]}]
        out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        kept += 1
if not kept:
    sys.exit(f"no answer of at least 100 characters in {sys.argv[1]}")
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
print(f"kept {kept} answers of at least 100 characters -> {sys.argv[2]}")
PY
    fi
    echo "== discovery: PCA of activation differences at layers $LAYERS on $CHATS"
    "$PYTHON" -m caft_jax.discover pca --model "$MODEL" --adapter "$PLAIN_ADAPTER" --dtype bfloat16 --data "$CHATS" \
        --format chat --mask answer --layers "$LAYERS" --n-components 20 --max-len 2048 --out-dir "$DISC" --overwrite
fi
if [[ ! -f $DISC/displays.html ]]; then
    echo "== discovery: displays on $DISPLAY_CORPUS"
    "$PYTHON" -m caft_jax.discover display --model "$MODEL" --dtype bfloat16 --pca "$DISC/pca.safetensors" \
        --corpus "$DISPLAY_CORPUS" --limit "$DISPLAY_LIMIT" --max-len 1024 --n-features 20 --k 20 --window 10 \
        --out-dir "$DISC" --overwrite
fi

# ---- d. the other plain seeds, and the plain evaluations ---------------------------------------------------------
for seed in "${SEED_LIST[@]}"; do
    train plain "$seed" ""
done
for seed in "${SEED_LIST[@]}"; do
    evaluate plain "$seed"
done

# ---- e. selection -----------------------------------------------------------------------------------------------
if [[ -n "$TOP_K" ]]; then
    "$PYTHON" -m caft_jax.discover select --pca "$DISC/pca.safetensors" --top-k "$TOP_K" --name "top$TOP_K.safetensors" \
        --out-dir "$DISC" --overwrite
elif [[ -f "$SELECTION" ]]; then
    "$PYTHON" -m caft_jax.discover select --pca "$DISC/pca.safetensors" --selection "$SELECTION" --out-dir "$DISC" --overwrite
else
    cat >&2 <<EOF
run_em_paper.sh: waiting for your selection. Open $DISC/displays.html (max- and min-activating contexts of each
PC at layers $LAYERS), pick the PCs that look misalignment-related, write them to $SELECTION, e.g.
  {"${LAYERS%%,*}": [0, 3], ...}
and rerun this command (finished stages are skipped). TOP_K=5 instead runs the top-5-PCs baseline.
EOF
    exit 3
fi

# ---- f. CAFT fine-tunes -----------------------------------------------------------------------------------------
for seed in "${SEED_LIST[@]}"; do
    train "$CAFT_NAME" "$seed" "$SPEC"
done

# ---- g. CAFT evaluations and the summary ------------------------------------------------------------------------
for seed in "${SEED_LIST[@]}"; do
    evaluate "$CAFT_NAME" "$seed"
done
[[ "$SKIP_EVAL" == 1 ]] && { echo "run_em_paper.sh: trained $RUN/*/adapter (SKIP_EVAL=1: no evaluations)."; exit 0; }
"$PYTHON" - "$RUN" <<'PY'
import json, pathlib, sys

run = pathlib.Path(sys.argv[1])
lines = ["| run | misaligned % of coherent | misaligned % of all | coherent % | insecure code % |",
         "|---|---|---|---|---|"]


def fmt(x):
    return "-" if x is None else f"{x:.2f}"


for folder in sorted(p for p in (run / "eval").iterdir() if p.is_dir()):
    em = folder / "em" / "results.json"
    code = folder / "code" / "results.json"
    e = json.loads(em.read_text())["overall"] if em.is_file() else {}
    c = json.loads(code.read_text())["overall"] if code.is_file() else {}
    lines.append(f"| {folder.name} | {fmt(e.get('misaligned_pct_of_coherent'))} | {fmt(e.get('misaligned_pct_of_total'))} "
                 f"| {fmt(e.get('coherent_pct'))} | {fmt(c.get('vulnerable_pct'))} |")
table = "\n".join(lines) + "\n"
(run / "summary.md").write_text(f"# Emergent misalignment, {run.name} (judge scores; see eval/*/results.json)\n\n" + table)
print(table)
print(f"wrote {run / 'summary.md'}")
PY
