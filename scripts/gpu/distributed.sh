#!/usr/bin/env bash
# On the GPU machine: data-parallel equalities on one GPU and the training-throughput before/after.
#   1. the tiny recipe and recipes/tests/code-100m.yaml (~100M parameters) on the Linux code corpus, 50 steps each:
#      1 rank over NCCL, 1 rank again (the run-to-run noise of GPU atomics), and 2 and 4 ranks sharing the GPU
#      through parallel.transport: mpi; the losses are compared step by step;
#   2. with BASE=<tree of an earlier commit> also `moba bench train` dense 8K and MoBA 32K of both trees, built in
#      this same call, so the comparison shares the machine's state.
# Needs the corpus at $MOBA_SHARED_DATA/linux-6.1-core.jsonl.xz. Results: $OUT/distributed.jsonl, $OUT/train.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp}
data=${MOBA_SHARED_DATA:-../shared/data}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OMP_NUM_THREADS=4
export NCCL_NVLS_ENABLE=0
source scripts/gpu/build_here.sh
gpu_build moba
moba=$PWD/build-gpu/moba
commit=${MOBA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)

if [ -n "${BASE:-}" ]; then  # the earlier tree first, so both binaries exist before anything is timed
  (cd "$BASE" && source scripts/gpu/build_here.sh && OUT=$out/base gpu_build moba) || { echo "base build failed"; exit 1; }
fi

work=/tmp/moba-dp
rm -rf $work && mkdir -p $work
$moba prep "$data/linux-6.1-core.jsonl.xz" --out $work/data --max-bytes 40000000 --seed 3 > $work/prep.log 2>&1
d="--set data.train=$work/data/train.h5 --set data.val=$work/data/val.h5"
run() {  # name ranks recipe extra...
  local name=$1 ranks=$2 recipe=$3; shift 3
  local t0=$(date +%s.%N)
  mpirun -np $ranks $moba train $recipe $d --set backend=cuda --set run_dir=$work/$name "$@" > $work/$name.log 2>&1 ||
    { echo "$name failed:"; tail -20 $work/$name.log; exit 1; }
  echo "$name $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s"
}
for recipe in tiny code-100m; do
  r=recipes/tests/$recipe.yaml
  extra=()
  [ $recipe = tiny ] && extra=(--set train.tokens=5.12e4 --set train.micro_batch_seqs=2)
  run $recipe-nccl1 1 $r --set parallel.transport=nccl "${extra[@]}"
  run $recipe-nccl1-again 1 $r --set parallel.transport=nccl "${extra[@]}"
  run $recipe-mpi2 2 $r --set parallel.transport=mpi "${extra[@]}"
  run $recipe-mpi4 4 $r --set parallel.transport=mpi "${extra[@]}"
  run $recipe-mpi2-zero0 2 $r --set parallel.transport=mpi --set parallel.zero=0 "${extra[@]}"
done
python3 - "$work" "$out/distributed.jsonl" "$commit" "$device" <<'PY'
import json, sys, datetime
work, path, commit, device = sys.argv[1:5]
def losses(name):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{work}/{name}/metrics.jsonl")) if "loss" in r}
with open(path, "a") as f:
    for recipe in ("tiny", "code-100m"):
        ref = losses(f"{recipe}-nccl1")
        for other in ("nccl1-again", "mpi2", "mpi4", "mpi2-zero0"):
            got = losses(f"{recipe}-{other}")
            diffs = [abs(got[s] - ref[s]) / ref[s] for s in ref]
            rec = {"date": datetime.date.today().isoformat(), "commit": commit, "device": device,
                   "command": f"scripts/gpu/distributed.sh ({recipe}, {other} vs 1 rank over NCCL)",
                   "bench": "dp_equality", "recipe": recipe, "run": other, "steps": len(ref),
                   "max_rel_loss_diff": max(diffs), "final_loss_ref": ref[max(ref)], "final_loss": got[max(got)]}
            f.write(json.dumps(rec) + "\n")
            print(f"{recipe:10} {other:12} steps {len(ref)}  max |dloss|/loss {max(diffs):.2e}  "
                  f"final {got[max(got)]:.4f} vs {ref[max(ref)]:.4f}")
PY
grep -h "ranks:\|f32 master" $work/code-100m-mpi4.log | head -3

if [ -n "${BASE:-}" ]; then
  for i in 1 2; do  # alternate base and head twice: the spread between repeats is the noise
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
