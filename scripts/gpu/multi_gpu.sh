#!/usr/bin/env bash
# On a machine with several GPUs (nvidia-h200-x2/-x4/-x8): the runs of the two multi-GPU issues, one GPU per rank
# over NCCL (NVLink multicast off: NCCL_NVLS_ENABLE=0, ../shared/docs/gpu-machine.md).
#   comm      `moba bench comm` on all GPUs: checked collectives, bus bandwidth (the record the scaling needs)
#   dp-equal  tiny recipe, 50 steps: 1 GPU twice, DP 2/4/8 with ZeRO 1, DP 2 with ZeRO 0; one step from the same
#             weights at steps 0 and 40 (scripts/gpu/same_step.py)
#   dp-scale  545M model, seq 8192 (full) and 32768 (MoBA): tokens/s on 1, 2, 4, 8 GPUs, the global batch growing
#             with the rank count (weak scaling, the per-rank work fixed); efficiency against N x one GPU
#   dp-kill   code-100m on 4 GPUs, rank 2 killed by --fault kill at step 6: the job must end within 60 s naming it;
#             the checkpoint of step 4 then resumes on 2 GPUs
#   cp-equal  tiny recipe, 50 steps: CP 2/4/8 and DP x CP = 2 x 2 against 1 GPU, then one step from the same weights
#   cp-scale  545M model, MoBA B 4096 k 12, one sequence per step: 128K tokens on 1 GPU, 256K on 2, 512K on 4, 1M on
#             8, all-MoBA and last 3 layers full; `moba plan` of each layout beside it
#   cp-eval   `moba eval --context 8` and `--context 4` of a 1M-token position-wise evaluation (cp-equal's tiny
#             checkpoint, evaluated with MoBA B 4096 k 12): the two must agree (needs 8 GPUs and cp-equal)
# Parts run in that order; those needing more GPUs than the machine has are skipped with a line saying so.
#   scripts/gpu/multi_gpu.sh [PART...]     (all by default)
# Needs $MOBA_SHARED_DATA/linux-6.1-core.jsonl.xz for the training parts. Results: $OUT/comm.jsonl,
# distributed.jsonl, context.jsonl, train.jsonl, plan.jsonl and metrics/ (every compared run's curve).
# shellcheck disable=SC2086  # $d, $nccl, $tiny50, $k, $s hold several options each
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp}
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=4 NCCL_NVLS_ENABLE=0
source scripts/gpu/build_here.sh
gpu_build moba
moba=$PWD/build-gpu/moba
gpus=$(nvidia-smi --list-gpus | wc -l)
parts=" ${*:-comm dp-equal dp-scale dp-kill cp-equal cp-scale cp-eval} "
wanted() { [[ $parts == *" $1 "* ]]; }
counts() { local n; for n in "$@"; do [ "$n" -le "$gpus" ] && echo "$n"; done; true; }  # the rank counts that fit
echo "multi_gpu.sh: $gpus GPUs ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)); parts:$parts"
nvidia-smi topo -m | head -12 || true

work=/tmp/moba-multi
rm -rf $work && mkdir -p $work
source scripts/gpu/linux_slice.sh
source scripts/gpu/train_runs.sh
if wanted dp-equal || wanted dp-kill || wanted cp-equal || wanted cp-eval; then linux_slice $moba $work/data; fi
d="--set data.train=$work/data/train.h5 --set data.val=$work/data/val.h5"
nccl="--set parallel.transport=nccl"

# One function per part; main() below runs the wanted ones, each in a subshell with set -e, so a failing part is
# reported and the next one still runs.

part_comm() {
  mpirun -np "$gpus" $moba bench comm --backend cuda --transport nccl --bytes 1M,16M,256M,1G \
    --out "$out/comm.jsonl" | python3 -c "
import json, sys
for line in sys.stdin:
    if line.startswith('{'):
        r = json.loads(line); print(f\"{r['op']:15} {r['bytes'] / 2**20:9.2f} MiB  {r['time_ms']:8.3f} ms  bus {r['busbw_gbps']:6.1f} GB/s\")"
}

part_dp_equal() {
  r=recipes/tests/tiny.yaml
  # 8 data-parallel ranks need a global batch of at least 8 micro-batches of 2 x 128 tokens: 2048 (50 steps).
  local t="$tiny50 --set train.global_batch_tokens=2048 --set train.tokens=1.024e5 --set checkpoint.every_tokens=20480"
  train_run tiny-gpu1 1 $r $nccl $t
  train_run tiny-gpu1-again 1 $r $nccl $t
  others="gpu1-again"
  for n in $(counts 2 4 8); do train_run tiny-dp$n "$n" $r $nccl $t; others="$others dp$n"; done
  if [ "$gpus" -ge 2 ]; then train_run tiny-dp2-zero0 2 $r $nccl --set parallel.zero=0 $t; others="$others dp2-zero0"; fi
  compare_runs "$out/distributed.jsonl" dp_equality_nccl gpu1 "tiny" "$others"
  for step in 0 40; do
    specs=("one 1 $nccl $t" "one-again 1 $nccl $t")
    for n in $(counts 2 4 8); do specs+=("dp$n $n $nccl $t"); done
    same_step "$out/distributed.jsonl" dp-nccl-tiny tiny-gpu1 $step $r "${specs[@]}"
  done
}

part_dp_scale() {
  for recipe in d1792-full-seq8192 d1792-moba-seq32768; do
    base=$(grep -o 'global_batch_tokens: [0-9]*' recipes/bench/$recipe.yaml | grep -o '[0-9]*$')
    for n in $(counts 1 2 4 8); do
      mpirun -np "$n" $moba bench train --recipe recipes/bench/$recipe.yaml $nccl \
        --set train.global_batch_tokens=$((base * n)) --warmup 2 --steps 5 --out "$out/train.jsonl" \
        > $work/scale-$recipe-$n.log 2>&1 || { echo "dp-scale $recipe on $n failed:"; tail -5 $work/scale-$recipe-$n.log; }
    done
  done
  python3 - "$out/train.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"bench": "train"' in l and '"transport": "nccl"' in l]
for recipe in sorted({r["recipe"] for r in rows}):
    by_ranks = {r["ranks"]: r for r in rows if r["recipe"] == recipe and r["context"] == 1}
    one = by_ranks.get(1)
    for n, r in sorted(by_ranks.items()):
        eff = f"{r['tokens_per_s'] / (n * one['tokens_per_s']):.3f} of linear" if one else "(no 1-GPU run)"
        print(f"{recipe}: {n} GPUs {r['tokens_per_s']:>10,.0f} tokens/s  {eff}")
PY
}

part_dp_kill() {
  [ "$gpus" -ge 4 ] || { echo "dp-kill: needs 4 GPUs, this machine has $gpus: skipped"; return 0; }
  r=recipes/tests/code-100m.yaml
  k="--set checkpoint.every_tokens=131072 --set checkpoint.keep=2"  # every 4 steps of 32768
  t0=$(date +%s)
  if train_run code-100m-kill 4 $r $nccl $k --fault kill:6:2; then echo "dp-kill: the job did not fail"; fi
  echo "dp-kill: ended after $(( $(date +%s) - t0 )) s; $(grep -o 'rank 2 with PID[^,]*' $work/code-100m-kill.log | head -1)"
  ls $work/code-100m-kill/checkpoints || true
  mpirun -np 2 $moba train $r $d $nccl $k --set run_dir=$work/code-100m-kill --max-steps 10 \
    > $work/code-100m-resume.log 2>&1 && grep -m1 "resumed from" $work/code-100m-resume.log || tail -5 $work/code-100m-resume.log
}

part_cp_equal() {
  r=recipes/tests/tiny.yaml
  # CP 8 cuts each sequence into 16 chunks of whole MoBA blocks (B 16): 256 tokens, where the recipe has 128.
  local t="$tiny50 --set data.seq_len=256"
  train_run tiny-cp1 1 $r $nccl $t
  others=""
  for c in $(counts 2 4 8); do train_run tiny-cp$c "$c" $r $nccl --set parallel.context=$c $t; others="$others cp$c"; done
  if [ "$gpus" -ge 4 ]; then train_run tiny-dp2cp2 4 $r $nccl --set parallel.context=2 $t; others="$others dp2cp2"; fi
  [ -z "$others" ] || compare_runs "$out/context.jsonl" cp_equality_nccl cp1 "tiny" "$others"
  specs=("one 1 $nccl $t")
  for c in $(counts 2 4 8); do specs+=("cp$c $c $nccl --set parallel.context=$c $t"); done
  [ ${#specs[@]} -lt 2 ] || same_step "$out/context.jsonl" cp-nccl-tiny tiny-cp1 40 $r "${specs[@]}"
}

part_cp_scale() {
  for layers in none last:3; do
    for c in $(counts 1 2 4 8); do
      local tag=$c-full-${layers/:/}
      seq=$((131072 * c))
      s="--set data.seq_len=$seq --set train.global_batch_tokens=$seq --set parallel.context=$c"
      s="$s --set attention.full_layers=$layers"
      $moba plan recipes/long/moba-1m-8gpu.yaml --ranks "$c" $s > $work/plan-$tag.txt 2>&1 && tail -1 $work/plan-$tag.txt >> "$out/plan.jsonl"
      mpirun -np "$c" $moba bench train --recipe recipes/long/moba-1m-8gpu.yaml $nccl $s --warmup 1 --steps 3 \
        --out "$out/train.jsonl" > $work/cp-$tag.log 2>&1 || { echo "cp-scale C=$c failed:"; tail -5 $work/cp-$tag.log; continue; }
      echo "cp-scale full_layers=$layers: $seq tokens on $c GPUs: $(tail -1 "$out/train.jsonl" | python3 -c "
import json, sys; r = json.load(sys.stdin); print(f\"{r['tokens_per_s'] / r['ranks']:,.0f} tokens/s per GPU, {r['step_ms']:.0f} ms/step, peak {r['peak_gib']:.1f} GiB\")")"
    done
  done
}

part_cp_eval() {
  [ "$gpus" -ge 8 ] && [ -d $work/tiny-cp1 ] || { echo "cp-eval: needs 8 GPUs and cp-equal's checkpoint: skipped"; return 0; }
  eval_len=1048576
  for c in 4 8; do
    mpirun -np $c $moba eval --checkpoint $work/tiny-cp1 --data $work/data/train.h5 --seq-len $eval_len \
      --bucket $((eval_len / 16)) --attention moba --block-size 4096 --top-k 12 --max-docs 2 --context $c \
      --out $work/eval-c$c > $work/eval-c$c.log 2>&1 || { echo "cp-eval C=$c failed:"; tail -5 $work/eval-c$c.log; }
  done
  python3 - "$work" "$out/context.jsonl" "${MOBA_COMMIT:-unknown}" "$(device_name)" "$eval_len" <<'PY'
import datetime, glob, json, sys
work, path, commit, device, n = sys.argv[1:6]
runs = {c: json.load(open(glob.glob(f"{work}/eval-c{c}/*.json")[0])) for c in (4, 8)}
diff = max(abs(a - b) for a, b in zip(runs[4]["position_loss"], runs[8]["position_loss"]))
rec = {"date": datetime.date.today().isoformat(), "commit": commit, "device": device,
       "command": "scripts/gpu/multi_gpu.sh cp-eval (moba eval --context 8 vs --context 4)", "bench": "cp_eval",
       "seq_len": int(n), "tokens": runs[8]["tokens"], "max_abs_position_loss_diff": diff,
       "mean_loss_c4": runs[4]["mean_loss"], "mean_loss_c8": runs[8]["mean_loss"]}
open(path, "a").write(json.dumps(rec) + "\n")
print(f"cp-eval: {rec['tokens']} tokens at N = {n}: mean loss {rec['mean_loss_c8']:.5f} (C 8) vs {rec['mean_loss_c4']:.5f} "
      f"(C 4), largest bucket difference {diff:.2e}")
PY
}

for part in comm dp-equal dp-scale dp-kill cp-equal cp-scale cp-eval; do
  wanted $part || continue
  echo "== $part"
  set +e
  (set -e; "part_${part//-/_}")
  rc=$?
  set -e
  [ $rc -eq 0 ] || echo "== $part FAILED (exit $rc); going on with the next part"
done
echo "multi_gpu.sh: done"
