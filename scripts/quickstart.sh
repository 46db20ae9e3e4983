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
# Position-wise loss within the trained context (256 tokens), the model as trained (MoBA B=32, k=3 in layers 0-2,
# full attention in layer 3) next to the same weights with full attention in every layer.
for attention in as-trained full; do
  ./build/moba eval --checkpoint "$run" --data "$data/val.h5" --seq-len 256 --bucket 32 --trailing 32 \
    --attention "$attention" --out "$run/eval"
done

python=python3
for candidate in /usr/bin/python3 python3; do
  if "$candidate" -c "import matplotlib" 2>/dev/null; then python=$candidate; break; fi
done
"$python" scripts/plot_run.py "$run"

echo
echo "Quickstart done."
echo "  run directory : $run (recipe.yaml, metrics.jsonl, checkpoints/)"
echo "  evaluation    : $run/eval/*.json, $run/eval/*.csv (as trained and with full attention, within 256 tokens)"
echo "  plots         : $run/loss_curve.png, $run/position_loss.png (+ position_loss.csv, position_loss_summary.csv)"
