#!/usr/bin/env python3
"""Overlays the position-wise loss of several `moba eval` results (their JSON files) in one plot, each curve's
trailing loss annotated, and writes the numbers next to it:
    plot_positions.py --out DIR/positions EVAL.json[=LABEL] ...
-> DIR/positions.png, DIR/positions.csv (one row per position bucket, one loss column per curve) and
DIR/positions_summary.csv (per curve: mean loss, trailing loss and its range, documents reaching the full length).
Labels default to the run names without their common prefix (plus the evaluated attention when a run appears
twice)."""
import argparse
import csv
import json
import os
import sys


def load_eval(path):
    with open(path) as f:
        result = json.load(f)
    for key in ("seq_len", "bucket", "trailing", "position_loss", "trailing_loss", "mean_loss"):
        if key not in result:
            raise ValueError(f"{path} has no '{key}': is it a `moba eval` JSON file?")
    return result


def default_labels(results):
    """Run names without the prefix they all share (e.g. "mini-positions-d256-l4-"), plus the evaluated attention
    when two results come from the same run."""
    names = [r.get("name", os.path.basename(r["checkpoint"])) for r in results]
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[:prefix.rfind("-") + 1]
    names = [n[len(prefix):] or n for n in names]
    if len(set(names)) == len(names):
        return names
    return [f"{n} ({r['attention']})" for n, r in zip(names, results)]


def overlay(results, labels, out_prefix, title="position-wise loss"):
    """Writes OUT_PREFIX.png, .csv and _summary.csv for `results` (loaded eval JSONs) under `labels`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = {(r["seq_len"], r["bucket"]) for r in results}
    if len(buckets) != 1:
        raise ValueError(f"the results use different seq_len/bucket {sorted(buckets)}: evaluate them alike")
    seq_len, bucket = buckets.pop()
    starts = list(range(0, seq_len, bucket))
    out_dir = os.path.dirname(out_prefix)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    with open(out_prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["position_start", "position_end"] + labels)
        for i, s in enumerate(starts):
            losses = [r["position_loss"][i] for r in results]
            w.writerow([s, min(seq_len, s + bucket)] + ["" if v is None else f"{v:.6f}" for v in losses])
    with open(out_prefix + "_summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "mean_loss", "trailing_loss", "trailing_start", "trailing_end", "full_length_sequences",
                    "attention", "checkpoint"])
        for label, r in zip(labels, results):
            w.writerow([label, r["mean_loss"], r["trailing_loss"], seq_len - r["trailing"], seq_len,
                        int(r.get("full_length_sequences", 0)), r.get("attention", ""), r.get("checkpoint", "")])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    centres = [s + min(bucket, seq_len - s) / 2 for s in starts]
    for i, (label, r) in enumerate(zip(labels, results)):
        points = [(x, y) for x, y in zip(centres, r["position_loss"]) if y is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        trailing = r["trailing_loss"]
        text = f"{label}: trailing {trailing:.4f}" if trailing is not None else f"{label}: no trailing loss"
        ax.plot(xs, ys, "o-", color=f"C{i}", markersize=3, label=text)
        if trailing is not None:
            ax.annotate(f"{trailing:.4f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(6, 0),
                        fontsize=7, color=f"C{i}", va="center")
    trailing_from = seq_len - results[0]["trailing"]
    ax.axvspan(trailing_from, seq_len, color="grey", alpha=0.1, lw=0)
    ax.set_xlim(0, seq_len * 1.08)
    ax.set_xlabel(f"position in document (bucket centres, {bucket} per bucket; shaded: trailing "
                  f"[{trailing_from}, {seq_len}))")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_prefix + ".png", dpi=120)
    plt.close(fig)
    return [out_prefix + ".png", out_prefix + ".csv", out_prefix + "_summary.csv"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", nargs="+", metavar="EVAL.json[=LABEL]", help="moba eval JSON files")
    ap.add_argument("--out", required=True, help="output prefix, e.g. docs/results/positions")
    ap.add_argument("--title", default="position-wise loss")
    args = ap.parse_args()
    paths, labels = [], []
    for item in args.evals:
        path, _, label = item.partition("=")
        paths.append(path)
        labels.append(label)
    try:
        results = [load_eval(p) for p in paths]
        defaults = default_labels(results)
        labels = [label or d for label, d in zip(labels, defaults)]
        written = overlay(results, labels, args.out, args.title)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r, label in zip(results, labels):
        print(f"{label}: mean {r['mean_loss']:.4f}, trailing [{r['seq_len'] - r['trailing']}, {r['seq_len']}) "
              f"{r['trailing_loss']}")
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
