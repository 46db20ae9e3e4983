#!/usr/bin/env python3
"""Plots a run: training/validation loss against tokens (loss_curve.png, attention switches marked) and the
`moba eval` results in <run>/eval overlaid by scripts/plot_positions.py (position_loss.png, .csv,
_summary.csv). Usage: plot_run.py RUN_DIR"""
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot_positions  # noqa: E402


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    run = sys.argv[1]
    metrics = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(metrics):
        print(f"error: {metrics} not found (is {run} a moba run directory?)", file=sys.stderr)
        return 1
    train, val, switches = [], [], []
    with open(metrics) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                train.append((row["tokens"], row["loss"]))
            if "val_loss" in row:
                val.append((row["tokens"], row["val_loss"]))
            if "attention" in row and "tokens" in row:
                switches.append((row["tokens"], row["attention"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    for tokens, attention in switches:
        ax.axvline(tokens, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"-> {attention}", (tokens, 1), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, va="top", ha="right", color="grey")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{os.path.basename(os.path.normpath(run))}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = os.path.join(run, "loss_curve.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")

    evals = sorted(glob.glob(os.path.join(run, "eval", "*.json")))
    if evals:
        results = [plot_positions.load_eval(p) for p in evals]
        shapes = sorted({(r["seq_len"], r["bucket"]) for r in results})
        if len(shapes) > 1:  # overlay only results evaluated alike: the longest evaluation
            keep = max(shapes)
            results = [r for r in results if (r["seq_len"], r["bucket"]) == keep]
            print(f"note: plotting the evaluations at seq_len {keep[0]} only (others: {shapes[:-1]})")
        labels = [f"{r['name']} step {r['step']}: {r['attention']}" for r in results]
        for path in plot_positions.overlay(results, labels, os.path.join(run, "position_loss")):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
