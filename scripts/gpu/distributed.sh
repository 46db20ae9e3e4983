#!/usr/bin/env bash
# On the GPU machine: data-parallel equalities on one GPU and the training-throughput before/after.
#   1. the tiny recipe and recipes/tests/code-100m.yaml (~100M parameters) on the Linux code corpus: 1 rank over
#      NCCL, 1 rank again (the run-to-run noise of GPU atomics), 2 and 4 ranks sharing the GPU through
#      parallel.transport: mpi (50 steps; code-100m on 4 only); the losses are compared step by step,
#      and on the tiny recipe one step from the same weights (steps 0, 20, 40): loss, grad norm, every gradient;
#      the tiny recipe also with full attention only (1 rank twice, 2 ranks), to tell routing from the rest;
#   2. with BASE=<tree of an earlier commit> also `moba bench train` dense 8K and MoBA 32K of both trees, built in
#      this same call, so the comparison shares the machine's state.
# Needs the corpus at $MOBA_SHARED_DATA/linux-6.1-core.jsonl.xz. Results: $OUT/distributed.jsonl, $OUT/train.jsonl.
#   scripts/gpu/distributed.sh [PART...]   PART: tiny (MoBA and full-attention curves, ~2 min), step (the one-step
#   checks, ~1.5 min), 100m (~7 min: 4 ranks time-slice one GPU), bench (needs BASE); all by default. One device
#   call is 10 minutes, so a machine that must also build and prepare data runs `tiny step` and `100m bench` apart.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=4
export NCCL_NVLS_ENABLE=0
source scripts/gpu/build_here.sh
gpu_build moba
moba=$PWD/build-gpu/moba
commit=${MOBA_COMMIT:-unknown}
parts=" ${*:-tiny step 100m bench} "
wanted() { [[ $parts == *" $1 "* ]]; }

if [ -n "${BASE:-}" ] && wanted bench; then  # the earlier tree first, so both binaries exist before anything is timed
  (cd "$BASE" && source scripts/gpu/build_here.sh && OUT=$out/base gpu_build moba) || { echo "base build failed"; exit 1; }
fi

work=/tmp/moba-dp
rm -rf $work && mkdir -p $work
source scripts/gpu/linux_slice.sh
linux_slice $moba $work/data
d="--set data.train=$work/data/train.h5 --set data.val=$work/data/val.h5"
source scripts/gpu/train_runs.sh
# The tiny recipe first (a minute; tiny50: train_runs.sh).
r=recipes/tests/tiny.yaml
if wanted tiny || wanted step; then  # the one-step checks start from tiny-nccl1's checkpoints
train_run tiny-nccl1 1 $r --set parallel.transport=nccl $tiny50
fi
if wanted tiny; then
train_run tiny-nccl1-again 1 $r --set parallel.transport=nccl $tiny50
train_run tiny-mpi2 2 $r --set parallel.transport=mpi $tiny50
train_run tiny-mpi4 4 $r --set parallel.transport=mpi $tiny50
train_run tiny-mpi2-zero0 2 $r --set parallel.transport=mpi --set parallel.zero=0 $tiny50
compare_runs "$out/distributed.jsonl" dp_equality nccl1 "tiny" "nccl1-again mpi2 mpi4 mpi2-zero0"
# The same with full attention in every layer: on CPU ranks both stay within 7e-6 of one rank over 50 steps
# (scripts/drift_cpu.sh), so a GPU drift here too would point away from MoBA's routing.
f="--set attention.mode=full $tiny50"
train_run tiny-full-nccl1 1 $r --set parallel.transport=nccl $f
train_run tiny-full-nccl1-again 1 $r --set parallel.transport=nccl $f
train_run tiny-full-mpi2 2 $r --set parallel.transport=mpi $f
compare_runs "$out/distributed.jsonl" dp_equality nccl1 "tiny-full" "nccl1-again mpi2"
fi
# One step from the same weights (the tiny recipe's MoBA routing parts whole curves on rounding: same_step.py).
if wanted step; then
for step in 0 20 40; do
  same_step "$out/distributed.jsonl" dp-tiny tiny-nccl1 $step $r \
    "one 1 --set parallel.transport=nccl $tiny50" "one-again 1 --set parallel.transport=nccl $tiny50" \
    "mpi2 2 --set parallel.transport=mpi $tiny50" "mpi4 4 --set parallel.transport=mpi $tiny50" \
    "mpi2-zero0 2 --set parallel.transport=mpi --set parallel.zero=0 $tiny50"
done
fi
# ~100M parameters, 50 steps. Ranks sharing the GPU time-slice it: a step takes ~4 s on 2 ranks and ~7 s on 4
# (0.27 s on one), so 4 ranks only here (the 2-rank 50 steps are in bench/results/distributed.jsonl, 2026-12-05).
if wanted 100m; then
r=recipes/tests/code-100m.yaml
train_run code-100m-nccl1 1 $r --set parallel.transport=nccl
train_run code-100m-nccl1-again 1 $r --set parallel.transport=nccl
train_run code-100m-mpi4 4 $r --set parallel.transport=mpi
compare_runs "$out/distributed.jsonl" dp_equality nccl1 "code-100m" "nccl1-again mpi4"
grep -h "ranks:\|f32 master" $work/code-100m-mpi4.log | head -3
fi

if [ -n "${BASE:-}" ] && wanted bench; then
  for _ in 1 2; do  # alternate base and head twice: the spread between repeats is the noise
    for tree in "$BASE" .; do
      tag=$([ "$tree" = . ] && echo head || echo base)
      for r in d1792-full-seq8192 d1792-moba-seq32768; do
        (cd "$tree" && MOBA_COMMIT=$([ $tag = head ] && echo $commit || echo ${BASE_COMMIT:-base}) \
          build-gpu/moba bench train --recipe recipes/bench/$r.yaml --warmup 2 --steps 5 --out "$out/train.jsonl" \
          | tail -1 | python3 -c "import json,sys; r=json.load(sys.stdin); print('$tag', r['recipe'], r['tokens_per_s'], 'tok/s', round(r['peak_gib'],1), 'GiB')")
      done
    done
  done
fi
