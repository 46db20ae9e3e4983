#!/usr/bin/env python3
"""Noise estimate for the micro reproductions (docs/results/micro/README.md), read from the runs' metrics.jsonl:
the variants of one sweep see the same batches in the same order (same seed and data), so their per-step training
losses are paired; the gap to the reference over the last 20% of steps (mean, standard error, step-to-step spread)
says whether a validation gap is more than the wobble of one trajectory. One seed each: run-to-run noise is not
measured.
    analysis.py RUNS_DIR --out DIR  ->  DIR/training_gaps.csv, DIR/training_gaps.png"""
import argparse
import csv
import json
import os

import numpy as np

# (sweep directory, reference run, compared runs)
COMPARISONS = [
    ("micro-scaling", "d32-l1-full", ["d32-l1-moba"]),
    ("micro-scaling", "d48-l2-full", ["d48-l2-moba"]),
    ("micro-scaling", "d64-l2-full", ["d64-l2-moba"]),
    ("micro-scaling", "d96-l2-full", ["d96-l2-moba"]),
    ("micro-scaling-tpp20", "d48-l2-full", ["d48-l2-moba"]),
    ("micro-scaling-tpp20", "d64-l2-full", ["d64-l2-moba"]),
    ("micro-positions", "d64-l4-full",
     ["d64-l4-moba", "d64-l4-hybrid-90-10", "d64-l4-layerwise-last1", "d64-l4-moba-b8-k9"]),
    ("micro-sft", "d64-l4-all-full", ["d64-l4-all-moba", "d64-l4-last1-full", "d64-l4-last3-full"]),
    ("micro-sft2k", "d64-l4-all-full", ["d64-l4-all-moba", "d64-l4-last1-full", "d64-l4-last3-full"]),
]


def read_metrics(path):
    """Per-step training losses (in step order) and the final validation loss."""
    losses, val = {}, None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                losses[row["step"]] = row["loss"]
            if row.get("val_loss") is not None:
                val = row["val_loss"]
    return np.array([losses[s] for s in sorted(losses)]), val


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="the directory holding micro-scaling/, micro-positions/, ... (the sweeps' out)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    rows, curves = [], []
    for sweep, ref, others in COMPARISONS:
        ref_loss, ref_val = read_metrics(os.path.join(args.runs, sweep, "runs", ref, "metrics.jsonl"))
        for run in others:
            loss, val = read_metrics(os.path.join(args.runs, sweep, "runs", run, "metrics.jsonl"))
            gap = loss - ref_loss                      # [steps], paired per batch
            tail = gap[-max(5, len(gap) // 5):]        # the last 20% of steps
            rows.append({"sweep": sweep, "run": run, "reference": ref, "steps": len(gap),
                         "step1_gap": f"{gap[0]:.4f}",
                         "train_gap_last20pct": f"{tail.mean():.4f}",
                         "train_gap_se": f"{tail.std(ddof=1) / np.sqrt(len(tail)):.4f}",
                         "train_gap_step_sd": f"{tail.std(ddof=1):.4f}",
                         "val_gap": f"{val - ref_val:.4f}"})
            windows = np.array_split(gap, 10)          # the gap per tenth of training
            curves.append((f"{sweep.removeprefix('micro-')}: {run}", [w.mean() for w in windows]))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "training_gaps.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = {"scaling": "scaling: MoBA - full", "positions": "positions: variant - full",
              "sft": "SFT: variant - all-full"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    x = (np.arange(10) + 0.5) / 10
    for label, values in curves:
        ax = axes[[label.startswith(p) for p in panels].index(True)]
        ax.plot(x, values, marker="o", ms=3, label=label)
    for ax, title in zip(axes, panels.values()):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("fraction of training (mean over each tenth of the steps)")
        ax.set_ylabel("paired training-loss gap (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "training_gaps.png"), dpi=100)


if __name__ == "__main__":
    main()
