#!/usr/bin/env bash
# Everything a lent GPU is for, in one call (the lease is short): exactness on the device, then the
# 7B-shaped bf16 benchmarks of forward (tokens/s, MFU, against transformers) and generation
# (batch 64, memory-bandwidth share, both layer layouts). Logs go to $OUT.
#   bash benchmarks/gpu.sh TOKENIZER_DIR
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/pvjax-gpu}
mkdir -p "$OUT"
step() {  # name, seconds, command...: each step has its own limit so one failure leaves the rest
    local name=$1 limit=$2; shift 2
    echo "=== $name"
    timeout "$limit" "$@" 2>&1 | grep -v "Writing model shards" | tee "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
step parity 120 python3 benchmarks/gpu_parity.py "$1"
# JAX would take 75% of the card up front; the forward benchmark runs transformers after it.
XLA_PYTHON_CLIENT_PREALLOCATE=false step forward 200 python3 benchmarks/forward.py --random-7b \
    --batch-size 16 --seq-len 1024 --iters 5 --reference
step generate_unrolled 150 python3 benchmarks/generate.py --random-7b --batch 64
step generate_scan 120 python3 benchmarks/generate.py --random-7b --batch 64 --scan
echo "=== summary"
grep -hE "^(ok|FAIL|gpu parity|device=|pvjax:|measured|reference|ratio|new tokens|memory)" "$OUT"/*.log
