#!/usr/bin/env python3
"""Plots a run: training/validation loss against tokens (loss_curve.png) and, for every `moba eval` CSV in
<run>/eval, the position-wise loss (position_loss.png). Usage: plot_run.py RUN_DIR"""
import csv
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    run = sys.argv[1]
    metrics = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(metrics):
        print(f"error: {metrics} not found (is {run} a moba run directory?)", file=sys.stderr)
        return 1
    train, val = [], []
    with open(metrics) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                train.append((row["tokens"], row["loss"]))
            if "val_loss" in row:
                val.append((row["tokens"], row["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{os.path.basename(os.path.normpath(run))}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = os.path.join(run, "loss_curve.png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")

    csvs = sorted(glob.glob(os.path.join(run, "eval", "*.csv")))
    if csvs:
        fig, ax = plt.subplots(figsize=(7, 4))
        for path in csvs:
            xs, ys = [], []
            with open(path) as f:
                for row in csv.DictReader(f):
                    if row["loss"] not in ("", "null"):
                        xs.append((int(row["bucket_start"]) + int(row["bucket_end"])) / 2)
                        ys.append(float(row["loss"]))
            ax.plot(xs, ys, "o-", label=os.path.basename(path)[:-4])
        ax.set_xlabel("position in document (bucket centre)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("position-wise loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = os.path.join(run, "position_loss.png")
        fig.savefig(out, dpi=120)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
