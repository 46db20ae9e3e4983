#!/usr/bin/env bash
# The GPU equality runs of scripts/gpu/{distributed,context}.sh on CPU ranks, for the tiny recipe with MoBA layers
# and with full attention: 1 rank twice, DP 2 and 4 (ZeRO 1 and 0), CP 2 and 4, 50 steps compared step by step,
# then one step from the same weights at steps 0, 20 and 40. On the H200 the tiny recipe's 2-rank curves part by
# 1% over 50 steps, 30x its run-to-run noise; this asks whether the same recipe and data do so in f32 on the CPU,
# where the runs differ only in the order of their sums.
#   scripts/drift_cpu.sh [OUT_DIR]    (~2 min on 2 cores; JSON lines in OUT_DIR/drift_cpu.jsonl, default /tmp)
# Needs ../shared/data/linux-6.1-core.jsonl.xz (or $MOBA_SHARED_DATA) and ./build/moba.
# shellcheck disable=SC2086  # $a, $d and $tiny50 hold several options each
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp}
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=1
export MOBA_COMMIT=${MOBA_COMMIT:-$(git rev-parse --short HEAD)}
moba=$PWD/build/moba backend=cpu work=/tmp/moba-drift-cpu
rm -rf $work && mkdir -p $work
source scripts/gpu/linux_slice.sh  # the same 40 MB slice the GPU scripts train on
linux_slice "$moba" $work/data
d="--set data.train=$work/data/train.h5 --set data.val=$work/data/val.h5"
source scripts/gpu/train_runs.sh
r=recipes/tests/tiny.yaml
for attention in moba full; do
  a="--set attention.mode=$attention $tiny50"
  train_run tiny-$attention-one 1 $r $a
  train_run tiny-$attention-one-again 1 $r $a
  train_run tiny-$attention-dp2 2 $r $a
  train_run tiny-$attention-dp4 4 $r $a
  train_run tiny-$attention-dp2-zero0 2 $r $a --set parallel.zero=0
  train_run tiny-$attention-cp2 2 $r $a --set parallel.context=2
  train_run tiny-$attention-cp4 4 $r $a --set parallel.context=4
done
compare_runs "$out/drift_cpu.jsonl" drift_cpu one "tiny-moba tiny-full" "one-again dp2 dp4 dp2-zero0 cp2 cp4"
a="--set attention.mode=moba $tiny50"
for step in 0 20 40; do
  same_step "$out/drift_cpu.jsonl" cpu-tiny tiny-moba-one $step $r "one 1 $a" "one-again 1 $a" "dp2 2 $a" \
    "dp4 4 $a" "cp2 2 --set parallel.context=2 $a" "cp4 4 --set parallel.context=4 $a"
done
