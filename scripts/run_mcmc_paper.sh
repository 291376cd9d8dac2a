#!/usr/bin/env bash
# The paper's 16 double-multiple-choice (MCMC) combinations on Gemma-2-2B, full fine-tuning (caft_method.md 1.5(b),
# 2.2, 3.2): one pipeline run per combination (base model, plain / CAFT / random-direction fine-tunes x 5 seeds,
# OOD accuracy on the intended question), then one combined table.
#
#   bash scripts/run_mcmc_paper.sh                        # all 16, settings of configs/pipeline_mcmc_gemma2_2b.yaml
#   bash scripts/run_mcmc_paper.sh --model /data/gemma-2-2b --seeds 3   # extra pipeline flags go to every run
#   ONLY="1 7" bash scripts/run_mcmc_paper.sh             # only these rows of the table (1-16)
#
# Runs from the repository root (relative paths in flags are taken from there). Each combination writes
# runs/mcmc_gemma2_2b/<a>_<b>_<intended>/ (results.md/.csv/.png, directions/, runs/); rerunning resumes every
# folder, and finished combinations only reload the model and reprint. A failed combination (e.g. no PC passed the
# probe-guided threshold) is reported and the loop goes on; the script then exits 1. The combined table is
# written to runs/mcmc_gemma2_2b/summary.md and summary.csv (every run's row with its combination).
# Environment: PYTHON (default python), CONFIG (default configs/pipeline_mcmc_gemma2_2b.yaml),
# OUT_ROOT (default runs/mcmc_gemma2_2b), ONLY (row numbers).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-configs/pipeline_mcmc_gemma2_2b.yaml}
OUT_ROOT=${OUT_ROOT:-runs/mcmc_gemma2_2b}
ONLY=${ONLY:-}

# (a, b, intended) of the paper figure, the order of caft_method.md 3.2 and `python -m caft_jax.tasks list`.
COMBINATIONS=(
    "verbs sentiment 1"
    "sports pronouns 0"
    "pronouns sports 0"
    "sentiment verbs 1"
    "sentiment sports 0"
    "verbs sports 0"
    "sentiment pronouns 0"
    "verbs pronouns 0"
    "sentiment verbs 0"
    "pronouns sports 1"
    "sports pronouns 1"
    "verbs sentiment 0"
    "sports sentiment 1"
    "sports verbs 1"
    "pronouns sentiment 1"
    "pronouns verbs 1"
)

[[ -f "$CONFIG" ]] || { echo "run_mcmc_paper.sh: error: $CONFIG not found (set CONFIG=...)." >&2; exit 2; }

failed=()
folders=()
for i in "${!COMBINATIONS[@]}"; do
    row=$((i + 1))
    if [[ -n "$ONLY" && " $ONLY " != *" $row "* ]]; then
        continue
    fi
    read -r a b intended <<<"${COMBINATIONS[$i]}"
    out="$OUT_ROOT/${a}_${b}_${intended}"
    folders+=("$row:$a:$b:$intended:$out")
    echo "=== [$row/16] $a | $b, intended $intended -> $out"
    resume=()  # continue a folder this script started (the pipeline checks its settings still match)
    [[ -f "$out/manifest.json" && " $* " != *" --overwrite "* ]] && resume=(--resume)
    if ! "$PYTHON" -m caft_jax.pipeline --config "$CONFIG" --a "$a" --b "$b" --intended "$intended" --out "$out" \
        ${resume[@]+"${resume[@]}"} "$@"
    then
        echo "=== [$row/16] $a | $b, intended $intended FAILED (see above); rerun to resume it." >&2
        failed+=("$row ($a | $b, intended $intended)")
    fi
done

# One table over the combinations: mean OOD (test) accuracy on the intended question per condition, over seeds.
"$PYTHON" - "$OUT_ROOT" ${folders[@]+"${folders[@]}"} <<'PY'
import csv, json, pathlib, statistics, sys

root = pathlib.Path(sys.argv[1])
long_rows, lines = [], []
header = ["#", "a", "b", "intended", "seeds", "base OOD", "plain OOD", "CAFT OOD", "random OOD",
          "CAFT OOD, ablation kept", "plain ID", "CAFT ID", "CAFT success"]
lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def mean(rows, condition, field):
    values = [float(r[field]) for r in rows if r["condition"] == condition and r.get(field) not in (None, "")]
    return statistics.mean(values) if values else None


def fmt(x):
    return "-" if x is None else f"{x:.3f}"


for item in sys.argv[2:]:
    row, a, b, intended, out = item.split(":", 4)
    path = pathlib.Path(out) / "results.csv"
    if not path.is_file():
        lines.append(f"| {row} | {a} | {b} | {intended} | not finished |" + " |" * (len(header) - 5))
        continue
    rows = list(csv.DictReader(path.open()))
    for r in rows:
        long_rows.append({"row": row, "a": a, "b": b, "intended": intended, **r})
    base = json.loads((pathlib.Path(out) / "base.json").read_text()) if (pathlib.Path(out) / "base.json").is_file() else {}
    plain, caft = mean(rows, "plain", "test"), mean(rows, "caft", "test")
    # the paper's success criterion (caft_method.md 3.2): CAFT above the plain fine-tune and above 0.5
    success = "-" if plain is None or caft is None else ("yes" if caft > plain and caft > 0.5 else "no")
    seeds = len({r["seed"] for r in rows})
    cells = [row, a, b, intended, str(seeds), fmt(base.get("test")), fmt(plain), fmt(caft),
             fmt(mean(rows, "random", "test")), fmt(mean(rows, "caft", "test_kept")),
             fmt(mean(rows, "plain", "val")), fmt(mean(rows, "caft", "val")), success]
    lines.append("| " + " | ".join(cells) + " |")

table = "\n".join(lines) + "\n"
root.mkdir(parents=True, exist_ok=True)
(root / "summary.md").write_text("# MCMC, Gemma-2-2B: OOD accuracy on the intended question (mean over seeds)\n\n" + table)
if long_rows:
    fields = list(dict.fromkeys(k for r in long_rows for k in r))
    with (root / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(long_rows)
print(table)
print(f"wrote {root / 'summary.md'}" + (f" and {root / 'summary.csv'}" if long_rows else ""))
PY

if ((${#failed[@]})); then
    echo "run_mcmc_paper.sh: ${#failed[@]} combination(s) failed: ${failed[*]}" >&2
    exit 1
fi
