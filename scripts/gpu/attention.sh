#!/usr/bin/env bash
# On the GPU machine: the attention kernel library's checks and its before/after, in one call.
#   1. builds this tree (moba and the GPU test executables) and, with BASE=<tree of an earlier commit>, that tree's
#      moba, side by side;
#   2. runs the GPU tests of this tree (ctest label gpu; $CTEST_EXCLUDE leaves some out; TrainGpu.* get a Linux
#      slice when $MOBA_SHARED_DATA holds linux-6.1-core.jsonl.xz);
#   3. with BASE: `moba bench attention` at dense 8K/32K and the MoBA configurations of ../shared/docs/anchors.md,
#      then `moba bench train` dense 8K and MoBA 32K, each configuration on the base tree then on this one, so both
#      share the machine's state; JSON lines go to $OUT/base.jsonl and $OUT/head.jsonl as they come, a table to
#      stdout.
# Build logs stay in /tmp/attention-logs (the device returns few files); $OUT gets ctest.log and the JSON lines.
#
#   BASE=/path/to/old-tree BASE_COMMIT=49b97e4 MOBA_COMMIT=<sha> scripts/gpu/attention.sh [--skip-tests] [CONFIG...]
#
# CONFIG names which benchmarks run (all by default, in this order; each 1M pair takes ~2 min, mostly setting up
# the inputs): dense-8k dense-32k moba-8k moba-32k moba-128k-2048 moba-128k-4096 gqa-128k train moba-1m-16384
# moba-1m-4096.
# Carry for a call: from a clean tree, `git archive BASE_SHA | tar -x -C /tmp/baseN`, then
# /work/tools/carry.sh NAME /tmp/baseN [/work/shared/data/moba-vectors.h5 linux-6.1-core.jsonl.xz] (< 64 MiB), and
#   cd .carry/NAME && export MOBA_COMMIT=<sha> MOBA_SHARED_DATA=$PWD/shared-data &&
#   BASE=$PWD/shared-data/baseN BASE_COMMIT=<base sha> scripts/gpu/attention.sh
# Passing (issue 10): "GPU tests: all passed" and every head/base row within 2%.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
commit=${MOBA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
skip_tests=0
if [ "${1:-}" = --skip-tests ]; then skip_tests=1; shift; fi
configs=" ${*:-dense-8k dense-32k moba-8k moba-32k moba-128k-2048 moba-128k-4096 gqa-128k train moba-1m-16384 moba-1m-4096} "
wanted() { [[ $configs == *" $1 "* ]]; }
logs=/tmp/attention-logs
mkdir -p $logs/head $logs/base
source scripts/gpu/build_here.sh
targets="moba $( ((skip_tests)) || ls tests | sed -n 's/^\(test_.*_gpu\)\.cpp$/\1/p' | tr '\n' ' ')"
if [ -n "${BASE:-}" ]; then
  (cd "$BASE" && source scripts/gpu/build_here.sh && OUT=$logs/base gpu_build moba) > $logs/base-build.txt 2>&1 &
  base_build=$!
fi
OUT=$logs/head gpu_build $targets
if [ -n "${BASE:-}" ]; then wait $base_build || { echo "base build failed:"; tail -20 $logs/base-build.txt; exit 1; }; fi
echo "---- builds done at $SECONDS s"

if ((skip_tests == 0)); then
  # TrainGpu.* train on a slice of the Linux corpus: prepared here when it was carried (they skip without it).
  source scripts/gpu/linux_slice.sh
  if linux_slice build-gpu/moba $logs/linux > /dev/null; then export MOBA_PREPARED_DATA=$logs/linux; fi
  (cd build-gpu && ctest --output-on-failure --no-tests=error ${CTEST_EXCLUDE:+-E "$CTEST_EXCLUDE"} -L gpu \
    > "$out/ctest.log" 2>&1) && echo "GPU tests: all passed" || echo "GPU tests: FAILURES (see ctest.log)"
  grep -E "tests passed|Failed|\*\*\*" "$out/ctest.log" | head -20 || true
  echo "---- tests done at $SECONDS s"
fi
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
wanted dense-8k && both $att --mode full --seq 8192 --heads 16
wanted dense-32k && both $att --mode full --seq 32768 --heads 16
wanted moba-8k && both $att --mode moba --seq 8192 --heads 16 --block 512 --topk 3
wanted moba-32k && both $att --mode moba --seq 32768 --heads 16 --block 512 --topk 3
wanted moba-128k-2048 && both $att --mode moba --seq 131072 --heads 16 --block 2048 --topk 3
wanted moba-128k-4096 && both $att --mode moba --seq 131072 --heads 16 --block 4096 --topk 8
wanted gqa-128k && both $att --mode moba --seq 131072 --heads 16 --kv-heads 4 --block 512 --topk 8
if wanted train; then
  both train --recipe recipes/bench/d1792-full-seq8192.yaml --warmup 2 --steps 5
  both train --recipe recipes/bench/d1792-moba-seq32768.yaml --warmup 2 --steps 5
fi
echo "---- up to 128K and training done at $SECONDS s"
table
# The 1M-token pairs last: a 600 s call may cut them, and the table above already holds the rest.
wanted moba-1m-16384 && both $att --mode moba --seq 1048576 --heads 8 --block 16384 --topk 3 --reps 2 --warmup 1
wanted moba-1m-4096 && both $att --mode moba --seq 1048576 --heads 8 --block 4096 --topk 12 --reps 2 --warmup 1
echo "---- benches done at $SECONDS s"
table
