#!/usr/bin/env bash
# On the GPU machine: context parallelism on one GPU (ranks share it through parallel.transport: mpi).
#   1. the tiny recipe and recipes/tests/moba-64k.yaml: CP 1 against CP 2 and 4, losses compared step by step, and
#      on the tiny recipe one step from the same weights (steps 0, 20, 40): loss, grad norm, every gradient;
#   2. what rank 0 allocated against the memory plan, and `moba plan --ranks C` against the per-rank peak memory
#      `moba bench train` measures;
#   3. training tokens/s at C = 1 before/after (BASE=<tree of an earlier commit>, built in this same call).
# Needs $MOBA_SHARED_DATA/linux-6.1-core.jsonl.xz. Results: $OUT/context.jsonl, $OUT/train.jsonl.
#   scripts/gpu/context.sh [PART...]   PART: tiny (~1.5 min), 64k (~3 min), plan (~1 min); all by default
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=4
source scripts/gpu/build_here.sh
gpu_build moba
moba=$PWD/build-gpu/moba
commit=${MOBA_COMMIT:-unknown}
parts=" ${*:-tiny 64k plan} "
wanted() { [[ $parts == *" $1 "* ]]; }
recipes=$(wanted tiny && echo tiny; wanted 64k && echo moba-64k; true)
work=/tmp/moba-cp
rm -rf $work && mkdir -p $work
source scripts/gpu/linux_slice.sh
linux_slice $moba $work/data
d="--set data.train=$work/data/train.h5 --set data.val=$work/data/val.h5"
source scripts/gpu/train_runs.sh
for recipe in $recipes; do
  r=recipes/tests/$recipe.yaml
  extra=(--set parallel.transport=mpi)
  # shellcheck disable=SC2206  # tiny50: several options
  [ $recipe = tiny ] && extra+=($tiny50)
  train_run $recipe-cp1 1 $r "${extra[@]}"
  train_run $recipe-cp1-again 1 $r "${extra[@]}"
  train_run $recipe-cp2 2 $r --set parallel.context=2 "${extra[@]}"
  train_run $recipe-cp4 4 $r --set parallel.context=4 "${extra[@]}"
done
[ -z "$recipes" ] || compare_runs "$out/context.jsonl" cp_equality cp1 "$recipes" "cp1-again cp2 cp4"
# The tiny recipe routes with B 16: its curves part after a few steps whatever the rank count (a routing flip on a
# rounding difference). One step from the same weights is the exact check, as on the CPU (same_step.py says why).
t="$tiny50 --set parallel.transport=mpi"
for step in 0 20 40; do
  wanted tiny || break
  same_step "$out/context.jsonl" cp-tiny tiny-cp1 $step recipes/tests/tiny.yaml "one 1 $t" "one-again 1 $t" \
    "cp2 2 --set parallel.context=2 $t" "cp4 4 --set parallel.context=4 $t"
done
# What rank 0 allocated against the trainer's memory plan (tests/test_context_parallel.cpp holds them within 5%).
for log in $work/*-cp?.log $work/*-cp1-again.log; do [ -f "$log" ] && echo "$(basename $log .log): $(grep -o 'memory: .*MiB)' $log | head -1)"; done
# The plan against the memory a run really takes, and the gathers' time, at 64K (CP 1, 2, 4) on this GPU.
for C in 1 2 4; do
  wanted plan || break
  $moba plan recipes/tests/moba-64k.yaml --ranks $C --set model.vocab_size=258 --set parallel.context=$C \
    > $work/plan$C.txt
  mpirun -np $C $moba bench train --recipe recipes/tests/moba-64k.yaml --set model.vocab_size=258 \
    --set parallel.context=$C --set parallel.transport=mpi --warmup 1 --steps 3 --out "$out/train.jsonl" \
    > $work/bench$C.log 2>&1 || { tail -20 $work/bench$C.log; exit 1; }
  echo "CP $C: plan $(grep -o '"rank_bytes": [0-9]*' $work/plan$C.txt), measured peak $(tail -1 $out/train.jsonl | grep -o '"peak_gib": [0-9.]*')"
done
if [ -n "${BASE:-}" ]; then
  (cd "$BASE" && source scripts/gpu/build_here.sh && OUT=$out/base gpu_build moba)
  for i in 1 2; do
    for tree in "$BASE" .; do
      for r in d1792-full-seq8192 d1792-moba-seq32768; do
        (cd "$tree" && build-gpu/moba bench train --recipe recipes/bench/$r.yaml --warmup 2 --steps 5 \
          --out "$out/train.jsonl" | tail -1)
      done
    done
  done
fi
