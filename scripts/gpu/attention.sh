#!/usr/bin/env bash
# On the GPU machine: the attention kernel library's checks and its before/after, in one call.
#   1. builds this tree (moba and the GPU test executables) and, with BASE=<tree of an earlier commit>, that tree's
#      moba, side by side;
#   2. runs the GPU tests of this tree (ctest label gpu; $CTEST_EXCLUDE leaves some out);
#   3. with BASE: `moba bench attention` at dense 8K/32K and the six MoBA configurations of the README's table, then
#      `moba bench train` dense 8K and MoBA 32K, each configuration on the base tree then on this one, so both share
#      the machine's state; JSON lines go to $OUT/base.jsonl and $OUT/head.jsonl as they come, a table to stdout.
# Build logs stay in /tmp/attention-logs (the device returns few files); $OUT gets ctest.log and the JSON lines.
# Usage: BASE=/path/to/old-tree BASE_COMMIT=49b97e4 MOBA_COMMIT=<sha> scripts/gpu/attention.sh
#
# What validates and lands branch attn-gpu (the q_rows kernels of aaf9954 on main, CP on backend: cuda; no GPU has
# run them yet). Two device calls, the second only if the first passes:
#   here:   cd /work/wt/attn-gpu && git rebase main && nice ./scripts/build.sh (CPU tests green), then
#           rm -rf /tmp/base49 && mkdir /tmp/base49 && git archive 49b97e4 | tar -x -C /tmp/base49
#           /work/tools/carry.sh attn-gpu /tmp/base49 /work/shared/data/moba-vectors.h5        # ~41 MB
#   call 1: run(carry [".carry/attn-gpu"], timeout_s 600; ~6-9 min: both builds ~2, GPU tests ~2, benches ~4):
#           cd .carry/attn-gpu && export MOBA_COMMIT=<sha> MOBA_SHARED_DATA=$PWD/shared-data &&
#           BASE=$PWD/shared-data/base49 BASE_COMMIT=49b97e4 scripts/gpu/attention.sh
#           pass: "GPU tests: all passed" (AttentionOpsGpu.* = the op table with its query subsets and kernel
#           settings, CudaMoba.*, CudaOps.*, the model GPU tests), and every head/base row of the table within 2%
#           (issue 10); on a failure $OUT/ctest.log names the case, and nothing lands.
#   here:   /work/tools/carry.sh attn-gpu /work/shared/data/linux-6.1-core.jsonl.xz           # ~28 MB
#   call 2: cd .carry/attn-gpu && export MOBA_COMMIT=<sha> MOBA_SHARED_DATA=$PWD/shared-data && scripts/gpu/context.sh
#           (no BASE: call 1 measured training before/after). pass: every cp2/cp4 run's max |dloss|/loss against
#           cp1 of the order of cp1-again's (the run-to-run noise of bf16 and atomic adds), each run's "memory: X MiB
#           allocated ... (the plan: Y MiB)" within 5% (tests/test_context_parallel.cpp's bound on the CPU), and
#           `moba plan --ranks C` against the measured peak (the peak adds transient buffers: expect it above).
#   then:   copy $OUT's base.jsonl/head.jsonl lines into bench/results/attention.jsonl and train.jsonl, context.jsonl
#           and train.jsonl of call 2 likewise; README: the status line of context parallelism (tested on an H200),
#           the performance tables if a figure moved; land (git -C /work/main merge --ff-only attn-gpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
commit=${MOBA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
logs=/tmp/attention-logs
mkdir -p $logs/head $logs/base
source scripts/gpu/build_here.sh
targets="moba $(ls tests | sed -n 's/^\(test_.*_gpu\)\.cpp$/\1/p' | tr '\n' ' ')"
if [ -n "${BASE:-}" ]; then
  (cd "$BASE" && source scripts/gpu/build_here.sh && OUT=$logs/base gpu_build moba) > $logs/base-build.txt 2>&1 &
  base_build=$!
fi
OUT=$logs/head gpu_build $targets
if [ -n "${BASE:-}" ]; then wait $base_build || { echo "base build failed:"; tail -20 $logs/base-build.txt; exit 1; }; fi
echo "---- builds done at $SECONDS s"

# TrainGpu.* train on a slice of the Linux corpus: prepared here when it was carried (they skip without it).
source scripts/gpu/linux_slice.sh
if linux_slice build-gpu/moba $logs/linux > /dev/null; then export MOBA_PREPARED_DATA=$logs/linux; fi
(cd build-gpu && ctest --output-on-failure --no-tests=error ${CTEST_EXCLUDE:+-E "$CTEST_EXCLUDE"} -L gpu \
  > "$out/ctest.log" 2>&1) && echo "GPU tests: all passed" || echo "GPU tests: FAILURES (see ctest.log)"
grep -E "tests passed|Failed|\*\*\*" "$out/ctest.log" | head -20 || true
echo "---- tests done at $SECONDS s"
[ -n "${BASE:-}" ] || exit 0

bench() {  # tag tree args...: one bench line of one tree
  local tag=$1 tree=$2; shift 2
  (cd "$tree" && MOBA_COMMIT=$([ "$tag" = head ] && echo "$commit" || echo "${BASE_COMMIT:-base}") \
    build-gpu/moba bench "$@" | tail -1) >> "$out/$tag.jsonl" || echo "$tag bench $* failed"
}
both() { bench base "$BASE" "$@"; bench head . "$@"; }
table() {  # head/base of every configuration both trees have measured so far
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = {}
for tag in ("base", "head"):
    path = os.path.join(out, f"{tag}.jsonl")
    for line in open(path) if os.path.exists(path) else []:
        r = json.loads(line)
        key = (f'{r["mode"]} N={r["seq"]} H={r["heads"]}/{r["kv_heads"]} B={r["block"]} k={r["topk"]} (fwd+bwd ms)'
               if r["bench"] == "attention" else f'train {os.path.basename(r["recipe"])} (tokens/s)')
        value = r["fwdbwd_ms"] if r["bench"] == "attention" else r["tokens_per_s"]
        rows.setdefault(key, {})[tag] = (value, r["peak_gib"])
for key, v in rows.items():
    if "base" in v and "head" in v:
        b, h = v["base"][0], v["head"][0]
        print(f"{key:60} base {b:10.3f}  head {h:10.3f}  head/base {h / b:.4f}  peak {v['base'][1]:.2f} -> {v['head'][1]:.2f} GiB")
PY
}
att="attention --head-dim 128"
both $att --mode full --seq 8192 --heads 16
both $att --mode full --seq 32768 --heads 16
both $att --mode moba --seq 8192 --heads 16 --block 512 --topk 3
both $att --mode moba --seq 32768 --heads 16 --block 512 --topk 3
both $att --mode moba --seq 131072 --heads 16 --block 2048 --topk 3
both $att --mode moba --seq 131072 --heads 16 --kv-heads 4 --block 512 --topk 8
both train --recipe recipes/bench/d1792-full-seq8192.yaml --warmup 2 --steps 5
both train --recipe recipes/bench/d1792-moba-seq32768.yaml --warmup 2 --steps 5
echo "---- 128K and training done at $SECONDS s"
table
# The 1M-token pairs last: each run takes about a minute (most of it setting up the inputs), so a 600 s call may
# cut them; the table above already holds the rest.
both $att --mode moba --seq 1048576 --heads 8 --block 16384 --topk 3 --reps 2 --warmup 1
both $att --mode moba --seq 1048576 --heads 8 --block 4096 --topk 12 --reps 2 --warmup 1
echo "---- benches done at $SECONDS s"
table
