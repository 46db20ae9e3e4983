#!/usr/bin/env bash
# Sourced by scripts/gpu/{distributed,context}.sh: short training runs of one recipe on several rank counts and
# their step-by-step loss comparison. Expects $moba (binary), $work (scratch), $d (--set data... options).
train_run() {  # NAME RANKS RECIPE [moba train options...]
  local name=$1 ranks=$2 recipe=$3; shift 3
  local t0; t0=$(date +%s.%N)
  mpirun -np "$ranks" "$moba" train "$recipe" $d --set backend=cuda --set run_dir="$work/$name" "$@" \
    > "$work/$name.log" 2>&1 || { echo "$name failed:"; tail -20 "$work/$name.log"; return 1; }
  echo "$name $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s"
}

# compare_runs OUT_JSONL BENCH_NAME REFERENCE_SUFFIX "RECIPES" "OTHER_SUFFIXES": each RECIPE-OTHER run against
# RECIPE-REFERENCE, as JSON lines (max relative loss difference over the steps) and a printed table.
compare_runs() {
  python3 - "$work" "$@" "${MOBA_COMMIT:-unknown}" "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" <<'PY'
import json, sys, datetime
work, path, bench, reference, recipes, others, commit, device = sys.argv[1:9]
def losses(name):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{work}/{name}/metrics.jsonl")) if "loss" in r}
with open(path, "a") as f:
    for recipe in recipes.split():
        ref = losses(f"{recipe}-{reference}")
        for other in others.split():
            got = losses(f"{recipe}-{other}")
            diff = max(abs(got[s] - ref[s]) / ref[s] for s in ref)
            rec = {"date": datetime.date.today().isoformat(), "commit": commit, "device": device,
                   "command": f"scripts/gpu ({recipe}, {other} vs {reference})", "bench": bench, "recipe": recipe,
                   "run": other, "reference": reference, "steps": len(ref), "max_rel_loss_diff": diff,
                   "final_loss": got[max(got)], "final_loss_reference": ref[max(ref)]}
            f.write(json.dumps(rec) + "\n")
            print(f"{recipe:10} {other:12} vs {reference}: steps {len(ref)}, max |dloss|/loss {diff:.2e}, "
                  f"final {got[max(got)]:.4f} vs {ref[max(ref)]:.4f}")
PY
}
