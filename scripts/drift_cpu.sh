#!/usr/bin/env bash
# The GPU equality runs of scripts/gpu/{distributed,context}.sh on CPU ranks, for the tiny recipe with MoBA layers
# and with full attention: 1 rank twice, DP 2 and 4 (ZeRO 1 and 0), CP 2 and 4, 50 steps compared step by step,
# then one step from the same weights at steps 0, 20 and 40. On the H200 the tiny recipe's 2-rank curves part by
# 1% over 50 steps, 30x its run-to-run noise; this asks whether the same recipe and data do so in f32 on the CPU,
# where the runs differ only in the order of their sums.
#   scripts/drift_cpu.sh [OUT_DIR]    (~3 min on 2 cores; JSON lines in OUT_DIR/drift_cpu.jsonl, default /tmp)
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
# The recipe as the GPU scripts run it (128 tokens: 8 blocks of 16, k 3), then at 256 tokens (16 blocks), where
# routing has more near-ties to break (one sequence per micro-batch there, so 4 data-parallel ranks fit the batch).
for seq in 128 256; do
  for attention in moba full; do
    name=tiny$([ $seq = 128 ] || echo -seq$seq)-$attention
    a="--set attention.mode=$attention --set data.seq_len=$seq $tiny50 --set train.micro_batch_seqs=$((256 / seq))"
    train_run $name-one 1 $r $a
    train_run $name-one-again 1 $r $a
    train_run $name-dp2 2 $r $a
    train_run $name-dp4 4 $r $a
    train_run $name-dp2-zero0 2 $r $a --set parallel.zero=0
    train_run $name-cp2 2 $r $a --set parallel.context=2
    train_run $name-cp4 4 $r $a --set parallel.context=4
  done
done
compare_runs "$out/drift_cpu.jsonl" drift_cpu one "tiny-moba tiny-full tiny-seq256-moba tiny-seq256-full" \
  "one-again dp2 dp4 dp2-zero0 cp2 cp4"
for seq in 128 256; do
  name=tiny$([ $seq = 128 ] || echo -seq$seq)-moba
  a="--set attention.mode=moba --set data.seq_len=$seq $tiny50 --set train.micro_batch_seqs=$((256 / seq))"
  for step in 0 20 40; do
    same_step "$out/drift_cpu.jsonl" cpu-$name $name-one $step $r "one 1 $a" "one-again 1 $a" "dp2 2 $a" \
      "dp4 4 $a" "cp2 2 --set parallel.context=2 $a" "cp4 4 --set parallel.context=4 $a"
  done
done
