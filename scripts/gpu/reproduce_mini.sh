#!/usr/bin/env bash
# On the GPU machine, inside a wall-clock budget: build moba (or use a carried binary that runs there), run the
# mini reproductions (scripts/reproduce_mini.sh) with stages starting only while 150 s remain and the whole driver
# stopped 60 s before the end, then the `moba bench train` runs behind the recipes/paper/ headers. Everything
# lands in $OUT: mini-results.tar.gz (runs without checkpoints), train.jsonl (bench records), reproduce.log.
# Usage: scripts/gpu/reproduce_mini.sh [budget seconds, default 420] [carried moba binary to try first] [driver args]
# (driver args, e.g. --smoke, go to scripts/reproduce_mini.sh: a CPU dry run of this script)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
budget=${1:-420}
carried=${2:-}
out=${OUT:-/tmp/out}
# Outside the working tree: a call that carries the tree again replaces it on the device, and the next call on the
# same warm machine resumes from what this one trained.
work=/tmp/moba-mini-work
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

moba=build-gpu/moba
if [ -n "$carried" ] && "$carried" --help > /dev/null 2>&1; then
  moba=$carried
  echo "[gpu] using the carried binary $carried"
else
  source scripts/gpu/build_here.sh
  gpu_build moba || exit 1
fi
echo "[gpu] moba ready at ${SECONDS}s"

# The reproductions; only progress lines reach the console, the whole log goes to $OUT.
timeout -k 10 $((budget - 60 - SECONDS)) scripts/reproduce_mini.sh --work "$work" --out "$out" --moba "$moba" \
  --shared "${MOBA_SHARED_DATA:-shared-data}" --deadline $((budget - 150 - SECONDS)) "${@:3}" > "$out/reproduce.log" 2>&1
status=$?
echo "[gpu] reproductions ended (exit $status) at ${SECONDS}s"
grep -E "^\[reproduce_mini|^\[sweep\]|error|FAILED" "$out/reproduce.log" | tail -60
(cd "$work" && tar czf "$out/mini-results.tar.gz" --exclude='*.h5' --exclude='*.h5.tmp' runs)

# Throughput behind the paper recipes' expected hours (README "Sweeps and reproductions"): the 545M MoBA model
# at 8K in full, and the 1.5B hybrid recipe's MoBA (B 2048) and full configurations at 32K, 4 of 20 layers (the
# per-layer FLOP rate; initialising 1.7B parameters on the host would cost more time than the steps). Only once
# the reproductions ran to their end: a call that they fill is resumed by the next one on the same warm machine
# ($work kept there), and its remaining seconds go to them, not to benchmarks.
if [ "$status" = 124 ] || [ "$status" = 137 ] || grep -q "deadline: skipping" "$out/reproduce.log"; then
  echo "[gpu] the reproductions ran out of time: no benchmarks this call"
  exit 0
fi
benches=(
  "--recipe recipes/bench/d1792-moba-seq8192.yaml --warmup 2 --steps 5"
  "--recipe recipes/paper/hybrid-1.5b-32k/1.5b-moba.yaml --set model.n_layers=4 --set train.global_batch_tokens=32768 --warmup 1 --steps 3"
  "--recipe recipes/paper/hybrid-1.5b-32k/1.5b-full.yaml --set model.n_layers=4 --set train.global_batch_tokens=32768 --warmup 1 --steps 3"
)
for args in "${benches[@]}"; do
  left=$((budget - 10 - SECONDS))
  if [ "$left" -lt 25 ]; then echo "[gpu] no time left for: bench train $args"; continue; fi
  # shellcheck disable=SC2086
  timeout -k 5 "$left" "$moba" bench train $args --out "$out/train.jsonl" 2>&1 | grep -E '^\{|error' || true
done
echo "[gpu] done at ${SECONDS}s"
