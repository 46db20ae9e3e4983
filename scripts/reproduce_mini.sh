#!/usr/bin/env bash
# The three mini reproductions of the MoBA paper (docs/results/micro/: the CPU-scaled runs) in one go, sized for minutes on one
# H200: prepare the data, then the layer-wise hybrid SFT (pre-train + 4 SFT runs), the 8K scaling ladder (4 sizes x
# full/MoBA), the 32K position-wise comparison (5 runs) and the ladder's block-local control (4 runs), each through
# scripts/sweep.py, with the overlay plot after the positions.
# Every stage is resumable (sweep.py skips finished runs) and is skipped once --deadline seconds have passed, so a
# time-limited machine returns what finished; results are packed into OUT/mini-results.tar.gz after each stage.
#
#   scripts/reproduce_mini.sh --work DIR --out OUT [--moba BIN] [--shared ../shared/data] [--deadline S]
#                             [--suite mini|micro] [--stages sft,scaling,positions,locality,seeds] [--smoke]
#
# --stages: only these reproductions (data preparation always runs, and is skipped when its files exist), e.g. what
# a first time-limited machine did not reach. `seeds` (the ladder and its locality control again with 3 seeds per
# run, where the suite has a scaling-seeds spec) is not in the default list: it is the longest stage.
# --suite micro: the specs of recipes/micro/ instead (the same experiments scaled to a 2-core CPU, ~1 hour).
# --smoke: the same stages on the CPU with every run cut to a step or two and contexts to 512 (a dry run of the
# whole pipeline before spending GPU time). Fits and plots need numpy/scipy/matplotlib; without them the stage
# says so and the raw CSV/JSONL still land in OUT.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=runs/mini-work out=runs/mini-out moba=$repo/build/moba shared=$repo/../shared/data deadline=100000 smoke=0
suite=mini stages=sft,scaling,positions,locality
while [ $# -gt 0 ]; do
  case $1 in
    --work) work=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --moba) moba=$2; shift 2 ;;
    --shared) shared=$2; shift 2 ;;
    --deadline) deadline=$2; shift 2 ;;
    --suite) suite=$2; shift 2 ;;
    --stages) stages=$2; shift 2 ;;
    --smoke) smoke=1; shift ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
for name in ${stages//,/ }; do
  case $name in sft|scaling|positions|locality|seeds) ;; *) echo "--stages: unknown stage $name (sft, scaling, positions, locality, seeds)" >&2; exit 2 ;; esac
done
moba=$(realpath "$moba"); shared=$(realpath "$shared")
mkdir -p "$work" "$out"; out=$(realpath "$out")
cd "$work"
ln -sfn "$repo/recipes" recipes
start=$SECONDS
python=python3
for candidate in /usr/bin/python3 python3; do
  if "$candidate" -c "import numpy, scipy, matplotlib" 2>/dev/null; then python=$candidate; break; fi
done
sweep=("$python" "$repo/scripts/sweep.py")
common=(--moba "$moba")
linux_bytes=110000000 docs_limit=()
if [ "$smoke" = 1 ]; then  # CPU, tiny: one or two steps per run, short contexts, small blocks
  common+=(--set backend=cpu --set data.seq_len=512 --set train.global_batch_tokens=2048 --set train.micro_batch_seqs=4
           --set attention.moba.block_size=64 --set train.schedule.warmup_tokens=0 --set eval.max_batches=2
           --tokens-per-parameter 0.002 --set train.tokens=4096)
  linux_bytes=6000000 docs_limit=(--max-bytes 3000000)
fi

log() { echo "[reproduce_mini $((SECONDS - start))s] $*"; }
time_left() { [ $((SECONDS - start)) -lt "$deadline" ] || { log "deadline: skipping $1"; return 1; }; }
pack() {
  log "packing results"
  local dirs=()
  for d in runs/"$suite"-*; do [ -d "$d" ] && dirs+=("$d"); done
  if [ ${#dirs[@]} -gt 0 ]; then
    tar czf "$out/$suite-results.tar.gz.tmp" --exclude='*.h5' --exclude='*.h5.tmp' "${dirs[@]}"
    mv "$out/$suite-results.tar.gz.tmp" "$out/$suite-results.tar.gz"
  fi
}
stage() {  # stage NAME COMMAND...: runs the command unless not chosen or the deadline passed; a failure is reported, not fatal
  local name=$1; shift
  [ "$name" = data ] || [[ ",$stages," == *",$name,"* ]] || { log "not chosen (--stages): $name"; return 0; }
  time_left "$name" || return 0
  log "stage $name"
  local t0=$SECONDS
  if "$@"; then log "stage $name done in $((SECONDS - t0))s"; else log "stage $name FAILED after $((SECONDS - t0))s"; fi
  echo "{\"stage\": \"$name\", \"seconds\": $((SECONDS - t0))}" >> "$out/stages.jsonl"
  pack
}

prepare_data() {  # every step checked: stage() runs this inside `if`, where set -e does not stop at a failure
  mkdir -p data
  if [ ! -f data/prepared/linux-mini/train.h5 ]; then
    # Decompressed by Python first: the GPU machine's moba has no liblzma. 1.3x: prep counts text, not JSON.
    python3 "$repo/scripts/xz_prefix.py" "$shared/linux-6.1-core.jsonl.xz" data/linux-slice.jsonl \
      $((linux_bytes * 13 / 10 + 1000000)) || return 1
    "$moba" prep data/linux-slice.jsonl --out data/prepared/linux-mini --max-bytes "$linux_bytes" --val-fraction 0.1 \
      --seed 1 || return 1
    rm -f data/linux-slice.jsonl
  fi
  if [ ! -f data/prepared/docs-sft-heldout/val.h5 ]; then
    "$python" "$repo/scripts/sft_pairs.py" "$shared/python-3.11-docs.jsonl.xz" --out data/prepared/docs-sft-source \
      --holdout-fraction 0.1 --seed 1 || return 1
    "$moba" prep data/prepared/docs-sft-source/pretrain.jsonl --out data/prepared/docs-pretrain --val-fraction 0.05 \
      --seed 1 "${docs_limit[@]}" || return 1
    "$moba" prep data/prepared/docs-sft-source/sft-train.jsonl --sft --out data/prepared/docs-sft --val-fraction 0.02 \
      --seed 1 "${docs_limit[@]}" || return 1
    # every held-out pair into val.h5 (prep keeps one document for train.h5)
    "$moba" prep data/prepared/docs-sft-source/sft-heldout.jsonl --sft --out data/prepared/docs-sft-heldout \
      --val-fraction 0.9999 --seed 1 || return 1
  fi
}

# Each reproduction: train and evaluate what can be (a failed run is reported and the others go on), then collect,
# fit and plot whatever finished.
sft() {
  local rc=0
  "${sweep[@]}" run recipes/$suite/sft-pretrain.sweep.json "${common[@]}" || return 1
  "${sweep[@]}" run recipes/$suite/sft.sweep.json "${common[@]}" || rc=1
  "${sweep[@]}" collect recipes/$suite/sft.sweep.json "${common[@]}" || rc=1
  return $rc
}

scaling() {
  local rc=0
  "${sweep[@]}" run recipes/$suite/scaling.sweep.json "${common[@]}" || rc=1
  "${sweep[@]}" collect recipes/$suite/scaling.sweep.json "${common[@]}" || rc=1
  "${sweep[@]}" fit recipes/$suite/scaling.sweep.json "${common[@]}" || rc=1
  "${sweep[@]}" fit recipes/$suite/scaling.sweep.json "${common[@]}" --compute flops || rc=1
  return $rc
}

positions() {
  local rc=0 eval_args=()
  [ "$smoke" = 1 ] && eval_args=(--eval seq_len=512 --eval bucket=64 --eval trailing=64 --eval max_docs=4)
  "${sweep[@]}" run recipes/$suite/positions.sweep.json "${common[@]}" "${eval_args[@]}" || rc=1
  "${sweep[@]}" collect recipes/$suite/positions.sweep.json "${common[@]}" "${eval_args[@]}" || rc=1
  "$python" "$repo/scripts/plot_positions.py" --out "runs/$suite-positions/positions" \
    --title "byte-level Linux sources, held-out documents ($suite)" runs/"$suite"-positions/eval/*.json || rc=1
  return $rc
}

# A follow-up of the scaling ladder from its own spec: the locality control (the same sweep with a block-local
# variant added, so only the new runs train) or the ladder with 3 seeds per run (the noise of the single-seed gaps).
# Suites without the spec skip the stage.
ladder() {
  local rc=0 spec=$1
  "${sweep[@]}" run "$spec" "${common[@]}" || rc=1
  "${sweep[@]}" collect "$spec" "${common[@]}" || rc=1
  "${sweep[@]}" fit "$spec" "${common[@]}" || rc=1
  return $rc
}

stage data prepare_data
stage sft sft
stage scaling scaling
stage positions positions
for follow_up in locality seeds; do
  spec=recipes/$suite/scaling-$follow_up.sweep.json
  if [ -f "$spec" ]; then stage "$follow_up" ladder "$spec"; fi
done
log "done in $((SECONDS - start))s; results in $out/$suite-results.tar.gz"
