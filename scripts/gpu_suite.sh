#!/usr/bin/env bash
# Issue 6's GPU measurements, for a lent GPU machine with jax, flax, optax, torch and timm:
# ours against timm eager / channels-last / torch.compile, bf16.
#
#   OUT=runs/gpu bash scripts/gpu_suite.sh b0          # B0 224 px batch 256: ~5-6 min on an H200 (estimated)
#   OUT=runs/gpu bash scripts/gpu_suite.sh b3 impls    # B3 300 px batch 128; B0 hybrid/shift depthwise
#   OUT=runs/gpu bash scripts/gpu_suite.sh profile     # B0 kernel time by op (scripts/profile_summary.py)
#   SMOKE=1 OUT=/tmp/s bash scripts/gpu_suite.sh b0    # tiny sizes, any backend: try it before a lease
#
# Every part is its own process with its own time cap, and prints its table as soon as it
# ends, so a slow compile costs only its part (measured on an H200, 2026-11-26: compiling our
# B0 train step at batch 256 took 58 s, autotuning included; timm's first torch.compile step 74 s).
# Parts of one call run on one machine; `--report` prints the combined table last.
# Use the machine's own jax/flax: a flax wheel carried from here (0.12.8) did not import
# with its jax 0.11.2.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU
PY=${PY:-python3}
START=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null >>"$OUT/env.txt"
$PY -c "import jax, flax, optax, torch, timm; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/env.txt"

if [ -n "${SMOKE:-}" ]; then
  B0="--model b0 --resolution 32 --batch 4" B3="--model b3 --resolution 32 --batch 2" STEPS="--steps 2 --repeats 1"
else
  B0="--model b0 --resolution 224 --batch 256" B3="--model b3 --resolution 300 --batch 128" STEPS="--steps 20 --repeats 3"
fi
COMMON="--dtype bfloat16 --warmup 3 $STEPS"

part() {  # part NAME CAP_SECONDS BENCHMARK_ARGS...: one process, its JSON lines in $OUT/NAME.jsonl
  local name=$1 cap=$2
  shift 2
  echo "== $name (cap ${cap}s, at $((SECONDS - START))s)"
  timeout "$cap" $PY scripts/benchmark.py "$@" --json "$OUT/$name.jsonl" 2>&1 | grep -v -e '^{' -e cuda_timer
  echo "   exit ${PIPESTATUS[0]}, at $((SECONDS - START))s"
}

for group in "$@"; do
  case $group in
    b0)
      part b0_ours_inference 60 $B0 $COMMON --depthwise_impl xla --modes inference
      part b0_ours_train 120 $B0 $COMMON --depthwise_impl xla --modes train
      part b0_timm_eager 90 $B0 $COMMON --peer_only --peer timm --timm_variants eager,eager-cl
      part b0_timm_compile 150 $B0 $COMMON --peer_only --peer timm --timm_variants compile-cl ;;
    b3)
      part b3_ours 200 $B3 $COMMON --depthwise_impl xla
      part b3_timm 200 $B3 $COMMON --peer_only --peer timm --timm_variants eager-cl,compile-cl ;;
    impls)
      part b0_hybrid_train 120 $B0 $COMMON --depthwise_impl hybrid --modes train
      part b0_shift 150 $B0 $COMMON --depthwise_impl shift ;;
    profile)  # per-kernel time by JAX op: `python scripts/profile_summary.py prof` after untarring
      part b0_profile 200 $B0 --dtype bfloat16 --warmup 1 --steps 2 --repeats 1 --depthwise_impl xla \
        --profile "$OUT/prof"
      $PY scripts/profile_summary.py "$OUT/prof" --top 25
      tar czf "$OUT/b0_profile.tgz" --exclude='*.xplane.pb' -C "$OUT" prof && rm -rf "$OUT/prof" ;;
    *) echo "unknown group $group (b0, b3, impls, profile)"; exit 2 ;;
  esac
done
echo "== done in $((SECONDS - START))s"
ls "$OUT"/*.jsonl >/dev/null 2>&1 && $PY scripts/benchmark.py --report "$OUT"/*.jsonl
