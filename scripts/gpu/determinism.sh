#!/usr/bin/env bash
# On the GPU machine: is `train.deterministic: true` bitwise reproducible run to run, and what does it cost? Builds
# moba and the GPU tests of the ops it changes (build-gpu, sm_90a), runs those tests, trains a short real run twice
# with deterministic true (every loss and gradient norm must match bit for bit) and twice with false (expected to
# differ: only reported), then times `moba bench train` on recipes/bench/d1792-moba-seq8192.yaml both ways.
# Every step logs and a failing step does not stop the later ones; a summary ends the output. About 4-5 minutes on an
# H100 from a fresh machine. Results in $OUT: determinism.jsonl (one line per check), bench.jsonl (bench records),
# ctest.log, build.log, runs/ (the four runs' metrics.jsonl and logs).
# Usage: OUT=/tmp/out MOBA_SHARED_DATA=/path/to/shared-data [MOBA_COMMIT=sha] scripts/gpu/determinism.sh
#   (MOBA_SHARED_DATA: a folder holding linux-6.1-core.jsonl.xz; default ../shared/data. MOBA_COMMIT: the commit
#   the records name, default `git rev-parse` here; set it when the tree was copied without its history)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
out=${OUT:-/tmp/out}
work=/tmp/moba-determinism
mkdir -p "$out/runs" "$work"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export MOBA_COMMIT=${MOBA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
results=$out/determinism.jsonl
: > "$results"
summary=()
log() { echo "[determinism ${SECONDS}s] $*"; }
# record NAME OK DETAIL: one JSON line in $results and one summary line.
record() {
  printf '{"date": "%s", "commit": "%s", "device": "%s", "command": "scripts/gpu/determinism.sh", "check": "%s", "ok": %s, "detail": "%s", "seconds": %s}\n' \
    "$(date -u +%F)" "$MOBA_COMMIT" "${device:-unknown}" "$1" "$2" "$3" "$SECONDS" >> "$results"
  summary+=("$([ "$2" = true ] && echo "PASS" || echo "FAIL")  $1: $3")
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# ---- 1. build ----
log "building moba and the GPU tests"
source scripts/gpu/build_here.sh
tests=(test_cuda_ops_gpu test_cuda_moba_gpu test_model_gpu test_attention_ops_gpu)
built=false
if gpu_build moba "${tests[@]}"; then built=true; fi
record build "$built" "ninja moba ${tests[*]} (log: build.log)"
moba=build-gpu/moba
[ -x "$moba" ] || { log "no moba binary: nothing else can run"; printf '%s\n' "${summary[@]}"; exit 1; }

# ---- 2. GPU tests of the touched ops (the new deterministic ones and the existing ones of the same ops) ----
if [ "$built" = true ]; then
  log "GPU tests"
  regex='^(CudaOps\.|CudaMoba\.|ModelGpu|AttentionOpsGpu\.)'
  if (cd build-gpu && ctest --output-on-failure --no-tests=error -R "$regex" > "$out/ctest.log" 2>&1); then
    record gpu_tests true "$(grep -E 'tests passed' "$out/ctest.log" | tail -1)"
  else
    record gpu_tests false "$(grep -E 'tests passed|\(Failed\)|\(SEGFAULT\)|\(Timeout\)' "$out/ctest.log" | tr '\n' ' ' | tr -d '"' | cut -c1-400)"
  fi
  grep -E "^\[ rel-L2|deterministic vs atomic|^step [0-9] loss" "$out/ctest.log" | head -40
fi

# ---- 3. a short real run, twice per setting ----
# The Linux slice (~10 MB of text; the GPU machine's moba has no liblzma, so Python decompresses first).
data=$work/linux-10m
corpus=${MOBA_SHARED_DATA:-../shared/data}/linux-6.1-core.jsonl.xz
if [ ! -f "$data/train.h5" ]; then
  log "preparing $data from $corpus"
  mkdir -p "$data"
  if python3 scripts/xz_prefix.py "$corpus" "$data/slice.jsonl" 14000000 &&
    "$moba" prep "$data/slice.jsonl" --out "$data" --max-bytes 10000000 --val-fraction 0.1 --seed 1 > "$data/prep.log" 2>&1; then
    record data true "$data"
  else
    record data false "no prepared data from $corpus (see $data/prep.log)"
  fi
fi
# recipes/mini/scaling.yaml at its d128-l2 size (scaling.sweep.json), MoBA with layer 1 full (both attention
# backwards), 50 steps of 64K tokens, every step logged, a short final evaluation.
train_args=(recipes/mini/scaling.yaml --set model.d_model=128 --set model.n_layers=2 --set model.n_heads=1
  --set model.n_kv_heads=1 --set "attention.full_layers=[1]" --set data.train="$data/train.h5"
  --set data.val="$data/val.h5" --set train.tokens=3276800 --set log.every_steps=1 --set eval.max_batches=2
  --set checkpoint.every_tokens=0)
train_run() {  # train_run NAME DETERMINISTIC
  local dir=$work/runs/$1
  rm -rf "$dir"
  log "train $1 (train.deterministic=$2)"
  timeout -k 5 120 "$moba" train "${train_args[@]}" --set run_dir="$dir" --set train.deterministic="$2" \
    > "$out/runs/$1.log" 2>&1
  local status=$?
  cp "$dir/metrics.jsonl" "$out/runs/$1.metrics.jsonl" 2>/dev/null
  [ "$status" = 0 ] || { log "train $1 exited $status:"; tail -5 "$out/runs/$1.log"; }
  return "$status"
}
# compare A B: prints "<identical true|false> <steps> <first differing step or -> <largest |loss difference|>"
compare() {
  python3 - "$out/runs/$1.metrics.jsonl" "$out/runs/$2.metrics.jsonl" <<'EOF'
import json, sys
def rows(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if "loss" in r and "grad_norm" in r:
            out[r["step"]] = (r["loss"], r["grad_norm"])
    return out
a, b = rows(sys.argv[1]), rows(sys.argv[2])
steps = sorted(set(a) & set(b))
differ = [s for s in steps if a[s] != b[s]]
largest = max((abs(a[s][0] - b[s][0]) for s in steps), default=0.0)
same = bool(steps) and not differ and set(a) == set(b)
print("true" if same else "false", len(steps), differ[0] if differ else "-", f"{largest:.3g}")
EOF
}
for setting in true false; do
  ok=true
  train_run "det-$setting-a" "$setting" || ok=false
  train_run "det-$setting-b" "$setting" || ok=false
  if [ "$ok" = true ] && result=$(compare "det-$setting-a" "det-$setting-b"); then
    read -r same steps first largest <<< "$result"
    detail="$steps steps, identical $same, first differing step $first, largest loss difference $largest"
    log "deterministic=$setting: $detail"
    if [ "$setting" = true ]; then record train_deterministic_true "$same" "$detail"
    else record train_deterministic_false true "$detail (expected to differ; reported only)"; fi
  else
    record "train_deterministic_$setting" false "a training run failed (see runs/*.log)"
  fi
done

# ---- 4. the cost: bench train, deterministic true vs false ----
for setting in false true; do
  log "bench train d1792-moba-seq8192, train.deterministic=$setting"
  if line=$(timeout -k 5 120 "$moba" bench train --recipe recipes/bench/d1792-moba-seq8192.yaml --warmup 2 --steps 5 \
    --set train.deterministic="$setting" --out "$out/bench.jsonl" 2> "$out/bench-$setting.log" | grep -E '^\{'); then
    step_ms=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["step_ms"])' "$line")
    record "bench_deterministic_$setting" true "step_ms $step_ms"
    echo "$line"
  else
    record "bench_deterministic_$setting" false "bench failed (see bench-$setting.log)"
    tail -5 "$out/bench-$setting.log"
  fi
done

echo "==== determinism summary (${SECONDS}s; $results) ===="
printf '%s\n' "${summary[@]}"
