#!/usr/bin/env bash
# Issue 6's GPU measurements, for a lent GPU machine with jax, flax, optax, torch and timm:
# ours against timm (eager, torch.compile; channels-last), bf16. Results: docs/benchmarks.md.
#
#   OUT=runs/gpu bash scripts/gpu_suite.sh b0      # B0 224 px batch 256 + profile: ~4.5 min on an H200 (estimated)
#   OUT=runs/gpu bash scripts/gpu_suite.sh b3      # B3 300 px batch 128: ~5 min (estimated)
#   OUT=runs/gpu bash scripts/gpu_suite.sh ab      # reference kernels (flax layers, per-leaf optax), hybrid depthwise, autotune off
#   OUT=runs/gpu bash scripts/gpu_suite.sh b0_ours b3_timm_compile   # single parts
#   SMOKE=1 OUT=/tmp/s bash scripts/gpu_suite.sh b0   # tiny sizes, any backend: try it before a lease
#
# Parts run one after another, each its own process with its own time cap, compiling cold.
# Do not compile our programs side by side to save time: XLA autotunes each convolution by
# timing candidates on the GPU, and under contention it picked kernels that made our B0 train
# step 15% slower (measured on an H200, 2026-11-26: 7,746 against 9,107 img/s compiled alone).
# Compile times alone, same day: our B0 train step 52 s, inference 7 s; timm's first
# torch.compile steps 74 s and 16 s. Each part's log and JSON lines go to $WORK, packed into
# $OUT/gpu_suite.tgz after every part, so a call killed at its limit still brings back what
# finished. Use the machine's own jax/flax: a flax wheel carried from here (0.12.8) did not
# import with its jax 0.11.2.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_suite}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU
PY=${PY:-python3}
START=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null >>"$WORK/env.txt"
$PY -c "import jax, flax, optax, torch, timm; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$WORK/env.txt"

if [ -n "${SMOKE:-}" ]; then
  B0="--model b0 --resolution 32 --batch 4" B3="--model b3 --resolution 32 --batch 2" STEPS="--steps 2 --repeats 1"
else
  B0="--model b0 --resolution 224 --batch 256" B3="--model b3 --resolution 300 --batch 128" STEPS="--steps 20 --repeats 3"
fi
TIMED="--dtype bfloat16 --warmup 3 $STEPS"

# group | name | cap (s) | XLA_FLAGS | benchmark.py arguments
PARTS=(
  "b0|b0_ours|150||$B0 --depthwise_impl xla --profile $WORK/prof"
  "b0|b0_timm_compile|150||$B0 --peer_only --peer timm --timm_variants compile-cl"
  "b0|b0_timm_eager|60||$B0 --peer_only --peer timm --timm_variants eager,eager-cl"
  "b3|b3_ours|200||$B3 --depthwise_impl xla"
  "b3|b3_timm_compile|200||$B3 --peer_only --peer timm --timm_variants compile-cl"
  "ab|b0_reference|150||$B0 --kernels reference"
  "ab|b0_hybrid|120||$B0 --depthwise_impl hybrid --modes train"
  "ab|b0_autotune0|90|--xla_gpu_autotune_level=0|$B0 --depthwise_impl xla --modes train"
)
[ $# -gt 0 ] || { echo "name groups (b0, b3, ab) or parts"; exit 2; }
WANT=" $* "

pack() { tar czf "$OUT/gpu_suite.tgz.tmp" -C "$WORK" --exclude='*.xplane.pb' . && mv "$OUT/gpu_suite.tgz.tmp" "$OUT/gpu_suite.tgz"; }

for p in "${PARTS[@]}"; do
  IFS='|' read -r group name cap flags args <<<"$p"
  [[ $WANT == *" $group "* || $WANT == *" $name "* ]] || continue
  echo "== $name (cap ${cap}s, at $((SECONDS - START))s)"
  XLA_FLAGS=$flags timeout "$cap" $PY scripts/benchmark.py $args $TIMED --json "$WORK/$name.jsonl" >"$WORK/$name.log" 2>&1
  echo "   exit $?, at $((SECONDS - START))s"
  grep -v -e '^{' -e cuda_timer "$WORK/$name.log" | tail -n 8
  if [[ $name == b0_ours && -d $WORK/prof ]]; then
    $PY scripts/profile_summary.py "$WORK/prof" --top 25 2>&1 | tee "$WORK/profile_summary.txt"
  fi
  pack
done
echo "== done in $((SECONDS - START))s"
ls "$WORK"/*.jsonl >/dev/null 2>&1 && $PY scripts/benchmark.py --report "$WORK"/*.jsonl | tee "$WORK/report.txt"
pack
