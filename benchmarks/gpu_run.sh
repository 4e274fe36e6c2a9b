#!/usr/bin/env bash
# One prepared benchmark run on a single GPU (H100 / H200), at most 6.5 minutes.
#
#   OUT=runs/gpu bash benchmarks/gpu_run.sh          # locally: SMOKE=1 for tiny sizes on CPU
#
# Writes under $OUT one JSON per part and log.txt (at most 8 files come back). Parts, by priority
# (each in its own process, with its own time limit, so one slow part cannot sink the others;
# a part cut short keeps the rows it finished in its JSON):
#   1. fuse at batch 1, bfloat16, 256x256, alone in a fresh process: its device peak memory is
#      the memory figure (the process holds only the encode half of the tokenizer + the model);
#   2. fuse at 256x256 and the train steps (stage I/II, tokenizer inside vs cached tokens);
#   3. TiTok encode in JAX (S-128, B-64, L-32; float32 and bfloat16);
#   4. the PyTorch reference encoder, eager (bfloat16, float32);
#   5. fuse at native 640x480;
#   6. the PyTorch reference encoder under torch.compile (bfloat16).
# Afterwards: python -m tokfusion_jax.bench --from_json=$OUT/fuse_train.json,... for one table.
set -u -o pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Allocate on demand so JAX and PyTorch can share the card and the peak reflects real use.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Parts share compiled programs (the batch-1 fuse of part 1 is reused by part 2).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/tokfusion_jax_cache}
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"

if [ "${SMOKE:-0}" = 1 ]; then
  PRESET=(--preset=tiny --fuse_variant=tiny --train_variant=tiny)
  MEM_SIZE=32x32
  NATIVE_SIZE=24x40
  TRAIN=(--train_size=32x32 --train_stages=1 --train_batches=1)
  LIMIT=${LIMIT:-20}
else
  PRESET=(--preset=gpu)
  MEM_SIZE=256x256
  NATIVE_SIZE=480x640
  TRAIN=()
  LIMIT=${LIMIT:-1}
fi
limit() { echo $(( $1 * LIMIT )); }  # seconds per part (LIMIT scales them in smoke runs)

bench() {  # bench NAME SECONDS ARGS...
  local name=$1 seconds=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${seconds}s)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=10 "$seconds" \
    $PY -m tokfusion_jax.bench "$@" --json="$OUT/$name.json" 2>&1 \
    | grep -v -e "^WARNING" -e "TF-TRT" | tee -a "$LOG"
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', \
flax.__version__, 'torch', torch.__version__)" 2>&1
} | tee -a "$LOG"

bench fuse_memory "$(limit 45)" "${PRESET[@]}" --rows=fuse --fuse_sizes="$MEM_SIZE" \
  --fuse_batches=1
bench fuse_train "$(limit 170)" "${PRESET[@]}" "${TRAIN[@]}" --rows=fuse,train \
  --fuse_sizes="$MEM_SIZE"
bench encode "$(limit 45)" "${PRESET[@]}" --rows=encode
bench torch_eager "$(limit 25)" "${PRESET[@]}" --rows=torch_encode --torch_compile=off
bench fuse_native "$(limit 35)" "${PRESET[@]}" --rows=fuse --fuse_sizes="$NATIVE_SIZE"
bench torch_compile "$(limit 35)" "${PRESET[@]}" --rows=torch_encode --torch_dtypes=bfloat16 \
  --torch_compile=only
echo "=== all done $(date -u +%H:%M:%S)" | tee -a "$LOG"
