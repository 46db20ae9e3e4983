#!/usr/bin/env bash
# On the GPU machine: builds (scripts/gpu/check.sh's configure) and runs the benchmark suite of the issues'
# tables, appending JSON lines to $OUT/attention.jsonl and $OUT/train.jsonl (copy them into bench/results/).
# Usage: scripts/gpu/bench.sh [attention|moba|train|all]
set -euo pipefail
cd "$(dirname "$0")/../.."
what=${1:-all}
out=${OUT:-/tmp}
source scripts/gpu/build_here.sh
gpu_build moba
moba=build-gpu/moba
att() { $moba bench attention "$@" --out "$out/attention.jsonl"; }
if [ "$what" = attention ] || [ "$what" = all ]; then
  att --mode full --seq 8192 --heads 16 --head-dim 128
  att --mode full --seq 32768 --heads 16 --head-dim 128
  att --mode full --seq 131072 --heads 16 --head-dim 128 --reps 5
fi
if [ "$what" = moba ] || [ "$what" = all ]; then
  att --mode moba --seq 8192 --heads 16 --head-dim 128 --block 512 --topk 3
  att --mode moba --seq 32768 --heads 16 --head-dim 128 --block 512 --topk 3
  att --mode moba --seq 131072 --heads 16 --head-dim 128 --block 2048 --topk 3
  att --mode moba --seq 131072 --heads 16 --kv-heads 4 --head-dim 128 --block 512 --topk 8
  att --mode moba --seq 1048576 --heads 8 --head-dim 128 --block 16384 --topk 3 --reps 3 --warmup 1
  att --mode moba --seq 1048576 --heads 8 --head-dim 128 --block 4096 --topk 12 --reps 3 --warmup 1
fi
if [ "$what" = train ] || [ "$what" = all ]; then
  for r in d1792-full-seq8192 d1792-full-seq32768 d1792-moba-seq32768; do
    $moba bench train --recipe recipes/bench/$r.yaml --warmup 2 --steps 5 --out "$out/train.jsonl"
  done
  # the memory / speed trade of activation recompute
  $moba bench train --recipe recipes/bench/d1792-full-seq8192.yaml --set train.recompute=full --warmup 2 --steps 5 \
    --out "$out/train.jsonl"
fi
echo "---- summary"
python3 - "$out" <<'PY'
import json, os, sys
for name in ("attention.jsonl", "train.jsonl"):
    path = os.path.join(sys.argv[1], name)
    if not os.path.exists(path):
        continue
    for line in open(path):
        r = json.loads(line)
        if r["bench"] == "attention":
            print(f'{r["mode"]:4} N={r["seq"]:>7} H={r["heads"]}/{r["kv_heads"]} B={r["block"]} k={r["topk"]}: '
                  f'fwd {r["fwd_ms"]:.3f} ms, fwd+bwd {r["fwdbwd_ms"]:.3f} ms, routing {r["routing_ms"]}, '
                  f'{r["useful_tflops"]:.0f} TFLOP/s, peak {r["peak_gib"]:.1f} GiB')
        else:
            print(f'train {r["recipe"]}: {r["tokens_per_s"]:.0f} tok/s, MFU {100*r["mfu"]:.1f}%, '
                  f'peak {r["peak_gib"]:.1f} GiB, step {r["step_ms"]:.1f} ms')
PY
