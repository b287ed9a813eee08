#!/usr/bin/env bash
# Everything a lent GPU is for, in one call (the lease is short): exactness on the device, then the
# 7B-shaped bf16 benchmarks of forward (tokens/s, MFU, against transformers) and generation
# (batch 64, memory-bandwidth share, both layer layouts). Logs go to $OUT.
#   bash benchmarks/gpu.sh [TOKENIZER_DIR]     (parity needs the tokenizer folder; without it, skipped)
#   STEPS="generate_unrolled generate_mesh train" bash benchmarks/gpu.sh   (only the steps named)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/pvjax-gpu}
mkdir -p "$OUT"
step() {  # name, seconds, command...: each step has its own limit so one failure leaves the rest
    local name=$1 limit=$2; shift 2
    [[ -z "${STEPS:-}" || " $STEPS " == *" $name "* ]] || return 0
    echo "=== $name"
    timeout "$limit" "$@" 2>&1 | grep -v "Writing model shards" | tee "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
[[ -n "${1:-}" ]] && step parity 120 python3 benchmarks/gpu_parity.py "$1"
# JAX would take 75% of the card up front; the forward benchmark runs transformers after it.
XLA_PYTHON_CLIENT_PREALLOCATE=false step forward 200 python3 benchmarks/forward.py --random-7b \
    --batch-size 16 --seq-len 1024 --iters 5 --reference
step generate_unrolled 150 python3 benchmarks/generate.py --random-7b --batch 64
step generate_scan 120 python3 benchmarks/generate.py --random-7b --batch 64 --scan
# The sharded path (generate_ids(mesh=...)) on one GPU must keep the unsharded path's bandwidth share.
step generate_mesh 150 python3 benchmarks/generate.py --random-7b --batch 64 --mesh
# MFU of a 7B-shaped bf16 LoRA step and a full-finetuning step against the measured matmul rate.
step train 240 python3 benchmarks/train.py --random-7b
echo "=== summary"
grep -hE "^(ok|FAIL|gpu parity|device=|pvjax:|measured|reference|ratio|new tokens|memory|lora|full|mfu|MFU)" "$OUT"/*.log
