#!/usr/bin/env bash
# The CAFT train-step benchmark on one NVIDIA GPU: Gemma-2-2B shapes with random weights (no download), bf16,
# full fine-tuning (the spurious-correlation recipe: bf16 weights and AdamW moments) and LoRA (r=32 rsLoRA,
# fp32 LoRA weights), batch 16 x seq 512 by default. Prints tokens/s and MFU against the GPU's dense bf16 peak
# (H100 SXM / H200: 989 TFLOP/s) and writes the tables, MFU included, to benchmarks/RESULTS.md.
#
#   benchmarks/gpu.sh                      # from the repository root, with caft_jax installed (pip install -e .)
#   BATCH=8 REMAT=full benchmarks/gpu.sh   # overrides: BATCH SEQ STEPS WARMUP REMAT PRESET PYTHON PEAK_TFLOPS
#                                          #   MODES="full lora" OVERHEAD_STEPS PEAK_N SKIP_INSTALL=1 OUT=dir
#                                          #   RESULTS=file
#
# MFU = analytic model FLOPs per step (caft_jax.aot.model_flops, remat not counted: forward 2 * matmul params *
# tokens + causal attention; backward 2x forward for full fine-tuning, 1x for LoRA) / step time / peak.
# Needs jax 0.10.2 with CUDA 12 (`pip install "jax[cuda12]==0.10.2"`; installed here if missing and the
# network allows). For a smoke test of this script without a GPU: ALLOW_CPU=1 JAX_PLATFORM=cpu
# PRESET=smollm2-135m BATCH=1 SEQ=32 STEPS=1 WARMUP=0 OVERHEAD_STEPS=1 PEAK_N=1024 PEAK_TFLOPS=1 \
# RESULTS=/tmp/smoke.md benchmarks/gpu.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
JAX_VERSION=0.10.2
PRESET=${PRESET:-gemma-2-2b}
BATCH=${BATCH:-16}
SEQ=${SEQ:-512}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
REMAT=${REMAT:-none}
MODES=${MODES:-full lora}
OVERHEAD_STEPS=${OVERHEAD_STEPS:-5}
PEAK_N=${PEAK_N:-8192}
JAX_PLATFORM=${JAX_PLATFORM:-cuda}
RESULTS=${RESULTS:-benchmarks/RESULTS.md}
OUT=${OUT:-$(mktemp -d /tmp/caft_gpu_bench.XXXXXX)}
mkdir -p "$OUT"

die() {
    echo "gpu.sh: error: $*" >&2
    exit 1
}

# ---- the GPU and its peak --------------------------------------------------------------------------------
if [[ "${ALLOW_CPU:-0}" == 1 ]]; then
    GPU_NAME=${GPU_NAME:-none (ALLOW_CPU smoke test)}
else
    command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this benchmark needs an NVIDIA GPU and its driver."
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1) || die "nvidia-smi could not list a GPU."
    [[ -n "$GPU_NAME" ]] || die "nvidia-smi lists no GPU."
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
PEAK=""
case "$GPU_NAME" in
    *H100*PCIe*) PEAK=756 ;;
    *H100*NVL*) PEAK=835 ;;
    *H100* | *H200* | *H800*) PEAK=989 ;; # SXM: 989.4 TFLOP/s dense bf16
    *A100*) PEAK=312 ;;
    *L40S*) PEAK=362 ;;
esac
PEAK=${PEAK_TFLOPS:-$PEAK}
[[ -n "$PEAK" ]] || die "no bf16 dense peak known for '$GPU_NAME'; set PEAK_TFLOPS=<TFLOP/s> (from the datasheet)."
echo "GPU: $GPU_NAME; bf16 dense peak used for MFU: $PEAK TFLOP/s"

# ---- jax with CUDA ---------------------------------------------------------------------------------------
"$PYTHON" -c "import caft_jax" 2>/dev/null ||
    die "caft_jax is not importable with '$PYTHON'; run 'pip install -e .' in the repository root (or set PYTHON)."
have_platform() {
    JAX_PLATFORMS=$JAX_PLATFORM "$PYTHON" -c "import jax; assert jax.devices()[0].platform in ('gpu', 'cpu'), jax.devices()" \
        >/dev/null 2>&1
}
if ! have_platform; then
    [[ "${SKIP_INSTALL:-0}" == 1 ]] && die "JAX sees no '$JAX_PLATFORM' device and SKIP_INSTALL=1; install jax[cuda12]==$JAX_VERSION."
    echo "JAX sees no '$JAX_PLATFORM' device: installing jax[cuda12]==$JAX_VERSION ..."
    "$PYTHON" -m pip install --quiet "jax[cuda12]==$JAX_VERSION" ||
        die "pip install 'jax[cuda12]==$JAX_VERSION' failed (no network?); install it, then rerun."
    have_platform || die "JAX still sees no GPU after installing jax[cuda12]==$JAX_VERSION; check the CUDA driver (nvidia-smi)."
fi
JAX_PLATFORMS=$JAX_PLATFORM "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
"$PYTHON" -c "import jax, sys; sys.exit(jax.__version__ != '$JAX_VERSION')" ||
    echo "gpu.sh: warning: jax is not $JAX_VERSION; numbers may not compare with RESULTS.md." >&2

# ---- runs ------------------------------------------------------------------------------------------------
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
status=0
for mode in $MODES; do
    case "$mode" in
        full) extra=(--full --trainable-dtype bfloat16) ;;
        lora) extra=() ;;
        *) die "unknown mode '$mode' in MODES (use full and/or lora)" ;;
    esac
    echo
    echo "=== $PRESET, $mode, bf16, batch $BATCH x seq $SEQ, remat $REMAT ==="
    if ! "$PYTHON" benchmarks/train_step.py --preset "$PRESET" --dtype bfloat16 --batch "$BATCH" --seq "$SEQ" \
        --steps "$STEPS" --warmup "$WARMUP" --overhead-steps "$OVERHEAD_STEPS" --remat "$REMAT" --skip-torch \
        --jax-platform "$JAX_PLATFORM" --peak-n "$PEAK_N" --peak-reps 20 \
        --mfu-peak-tflops "$PEAK" --results "$RESULTS" --label "GPU: $GPU_NAME" --json "$OUT/$mode.json" "${extra[@]}"; then
        echo "gpu.sh: the $mode run failed (out of memory? try BATCH=8 or REMAT=full)" >&2
        status=1
        continue
    fi
    "$PYTHON" - "$OUT/$mode.json" "$PEAK" "$mode" <<'EOF'
import json, sys

res, peak, mode = json.load(open(sys.argv[1])), float(sys.argv[2]) * 1e12, sys.argv[3]
jx = res["jax"]
mfu = res["flops"] / jx["step_s"] / peak
measured = jx.get("matmul_peak_flops")
print(f"MFU ({mode}): {100 * mfu:.1f}% = {res['flops'] / 1e12:.2f} TFLOP/step / {jx['step_s']:.3f} s "
      f"/ {peak / 1e12:.0f} TFLOP/s ({jx['tokens_per_s']:.0f} tokens/s; measured bf16 matmul peak "
      f"{(measured or 0) / 1e12:.0f} TFLOP/s, {100 * res['flops'] / jx['step_s'] / measured:.0f}% of it)"
      + ("  [target >= 50% on an H100 for full fine-tuning]" if mode == "full" else ""))
EOF
done
echo
echo "raw reports: $OUT"
exit $status
