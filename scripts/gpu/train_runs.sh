#!/usr/bin/env bash
# Sourced by scripts/gpu/{distributed,context}.sh: short training runs of one recipe on several rank counts and
# their step-by-step loss comparison. Expects $moba (binary), $work (scratch), $d (--set data... options).
# The tiny recipe as both scripts run it: 50 steps of 1024 tokens, a checkpoint every 10 kept for same_step below.
tiny50="--set train.tokens=5.12e4 --set train.micro_batch_seqs=2 --set checkpoint.every_tokens=10240"
tiny50="$tiny50 --set checkpoint.keep=10"

train_run() {  # NAME RANKS RECIPE [moba train options...]
  local name=$1 ranks=$2 recipe=$3; shift 3
  local t0; t0=$(date +%s.%N)
  mpirun -np "$ranks" "$moba" train "$recipe" $d --set backend="${backend:-cuda}" --set run_dir="$work/$name" "$@" \
    > "$work/$name.log" 2>&1 || { echo "$name failed:"; tail -20 "$work/$name.log"; return 1; }
  echo "$name $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s"
}

device_name() {  # for the JSON lines
  if [ "${backend:-cuda}" = cuda ]; then nvidia-smi --query-gpu=name --format=csv,noheader | head -1
  else echo "CPU ($(nproc --all) cores, backend cpu)"; fi
}

# compare_runs OUT_JSONL BENCH_NAME REFERENCE_SUFFIX "RECIPES" "OTHER_SUFFIXES": each RECIPE-OTHER run against
# RECIPE-REFERENCE, as JSON lines (max relative loss and grad-norm differences over the steps, the first step whose
# loss differs by more than 1e-6) and a printed table. Every run's metrics.jsonl is kept beside OUT_JSONL, in
# metrics/RUN.jsonl, for a look at its curve later.
compare_runs() {
  python3 - "$work" "$@" "${MOBA_COMMIT:-unknown}" "$(device_name)" "${0#./}" <<'PY'
import json, os, shutil, sys, datetime
work, path, bench, reference, recipes, others, commit, device, script = sys.argv[1:10]
kept = os.path.join(os.path.dirname(os.path.abspath(path)), "metrics")
os.makedirs(kept, exist_ok=True)
def curve(name):  # step -> (loss, grad_norm)
    shutil.copyfile(f"{work}/{name}/metrics.jsonl", f"{kept}/{name}.jsonl")
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, open(f"{work}/{name}/metrics.jsonl"))
            if "loss" in r and "grad_norm" in r}
with open(path, "a") as f:
    for recipe in recipes.split():
        ref = curve(f"{recipe}-{reference}")
        for other in others.split():
            got = curve(f"{recipe}-{other}")
            steps = sorted(s for s in ref if s in got)  # a run cut short by --max-steps: its steps only
            rel = lambda s, i: abs(got[s][i] - ref[s][i]) / abs(ref[s][i])
            diff = max(rel(s, 0) for s in steps)
            rec = {"date": datetime.date.today().isoformat(), "commit": commit, "device": device,
                   "command": f"{script} ({recipe}, {other} vs {reference})", "bench": bench, "recipe": recipe,
                   "run": other, "reference": reference, "steps": len(steps), "max_rel_loss_diff": diff,
                   "max_rel_grad_norm_diff": max(rel(s, 1) for s in steps),
                   "first_step_loss_over_1e-6": next((s for s in steps if rel(s, 0) > 1e-6), None),
                   "final_loss": got[steps[-1]][0], "final_loss_reference": ref[steps[-1]][0]}
            f.write(json.dumps(rec) + "\n")
            print(f"{recipe:10} {other:12} vs {reference}: steps {len(steps)}, max |dloss|/loss {diff:.2e}, "
                  f"final {got[steps[-1]][0]:.4f} vs {ref[steps[-1]][0]:.4f}")
PY
}

# same_step OUT_JSONL LABEL REFERENCE STEP RECIPE "NAME RANKS [options]"...: one optimizer step from REFERENCE's
# checkpoint at STEP (its initial weights for 0) for each NAME on RANKS ranks, compared with scripts/gpu/same_step.py
# against the first NAME. REFERENCE must have run with its checkpoints kept at STEP (checkpoint.every_tokens, keep).
same_step() {
  local jsonl=$1 label=$2 reference=$3 step=$4 recipe=$5; shift 5
  local keep names=() spec name ranks
  keep=$(printf 'step_%08d' "$step")
  for spec in "$@"; do
    read -r name ranks opts <<< "$spec"
    name=$label-from$step-$name
    rm -rf "${work:?}/$name" && cp -r "$work/$reference" "$work/$name"
    rm -f "$work/$name/metrics.jsonl"  # the reference's curve would shadow the resumed step
    for c in "$work/$name"/checkpoints/*; do [ "$step" -gt 0 ] && [ "$(basename "$c")" = "$keep" ] || rm -rf "$c"; done
    # shellcheck disable=SC2086  # opts: several options
    train_run "$name" "$ranks" "$recipe" $opts --max-steps 1 > /dev/null || return 1
    names+=("$name")
  done
  python3 scripts/gpu/same_step.py "$work" "$step" "$jsonl" "${MOBA_COMMIT:-unknown}" "$(device_name)" "$label" \
    "${names[@]}" 2>&1 |
    sed "s/^/  /"
}
