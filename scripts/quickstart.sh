#!/usr/bin/env bash
# From a fresh clone to a trained and evaluated model on the CPU in a few minutes:
# deps -> build -> tokenize the bundled sample corpus -> train recipes/quickstart.yaml -> evaluate -> plots.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh

data=data/prepared/sample
if [ ! -f "$data/train.h5" ]; then
  ./build/moba prep data/sample/python-docs.jsonl.xz --out "$data" --tokenizer byte --val-fraction 0.05 --seed 1234
fi

./build/moba train recipes/quickstart.yaml
run=runs/quickstart
./build/moba eval --checkpoint "$run" --data "$data/val.h5" --seq-len 1024 --bucket 128 --out "$run/eval"

python=python3
for candidate in /usr/bin/python3 python3; do
  if "$candidate" -c "import matplotlib" 2>/dev/null; then python=$candidate; break; fi
done
"$python" scripts/plot_run.py "$run"

echo
echo "Quickstart done."
echo "  run directory : $run (recipe.yaml, metrics.jsonl, checkpoints/)"
echo "  evaluation    : $run/eval/*.json, $run/eval/*.csv"
echo "  plots         : $run/loss_curve.png, $run/position_loss.png"
