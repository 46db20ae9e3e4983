#!/usr/bin/env python3
"""The micro reproductions with 3 seeds each (recipes/micro/*-seeds.sweep.json; docs/results/micro/README.md,
"Seeds"): what one seed's noise is, against the differences the single-seed runs reported.

    seeds.py RUNS_DIR --out DIR
RUNS_DIR holds micro-scaling-seeds/, micro-scaling-tpp20-seeds/, micro-positions-seeds/, micro-sft2k-seeds/, micro-sft2k-fullpre-seeds/ (the
sweeps' out, after `sweep.py collect`). Writes DIR/paired_differences.csv (every run minus the reference of its own seed, with the
sign test over seeds), DIR/positions_minus_full.csv and .png (per position bucket, each variant minus full
attention: mean and standard deviation over the seeds)."""
import argparse
import csv
import json
import math
import os

import numpy as np

SWEEPS = [  # (sweep directory, reference variant, loss compared)
    ("micro-scaling-seeds", "full", "val_loss"),
    ("micro-scaling-tpp20-seeds", "full", "val_loss"),  # follow-up 1: 20 tokens per parameter
    ("micro-positions-seeds", "full", "trailing_loss"),
    ("micro-sft2k-seeds", "all-full", "val_loss"),
    ("micro-sft2k-fullpre-seeds", "all-full", "val_loss"),  # the follow-up: SFT from a full-attention pre-training
]


def read_results(sweep_dir):
    with open(os.path.join(sweep_dir, "results.csv")) as f:
        return list(csv.DictReader(f))


def sign_test(negative, n):
    """Two-sided p-value of `negative` of n differences being below zero when either sign is equally likely."""
    k = max(negative, n - negative)
    tail = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_differences(runs_dir):
    rows = []
    for sweep, reference, loss in SWEEPS:
        results = read_results(os.path.join(runs_dir, sweep))
        value = {(r["size"], r["variant"], r["seed"]): float(r[loss]) for r in results if r[loss]}
        for size, variant in dict.fromkeys((r["size"], r["variant"]) for r in results):
            if variant == reference:
                continue
            seeds = sorted(s for (z, v, s) in value if (z, v) == (size, variant) and (size, reference, s) in value)
            diffs = np.array([value[(size, variant, s)] - value[(size, reference, s)] for s in seeds])
            rows.append({"sweep": sweep, "size": size, "variant": variant, "reference": reference, "loss": loss,
                         "seeds": len(diffs), "differences": " ".join(f"{d:+.4f}" for d in diffs),
                         "mean": f"{diffs.mean():+.4f}", "sd": f"{diffs.std(ddof=1):.4f}",
                         "se": f"{diffs.std(ddof=1) / math.sqrt(len(diffs)):.4f}",
                         "negative": int((diffs < 0).sum())})
    return rows


def position_differences(runs_dir):
    """{variant: [seeds x buckets] of eval position loss minus full's of the same seed}, bucket starts."""
    sweep = os.path.join(runs_dir, "micro-positions-seeds")
    curves, starts = {}, None
    for path in sorted(os.listdir(os.path.join(sweep, "eval"))):
        if not path.endswith(".json"):
            continue
        with open(os.path.join(sweep, "eval", path)) as f:
            result = json.load(f)
        run = result["name"].removeprefix("micro-positions-seeds-d64-l4-")
        variant, seed = run.rsplit("-s", 1)
        curves[(variant, seed)] = np.array(result["position_loss"])
        starts = [i * result["bucket"] for i in range(len(result["position_loss"]))]
    out = {}
    for (variant, seed), curve in sorted(curves.items()):
        if variant != "full":
            out.setdefault(variant, []).append(curve - curves[("full", seed)])
    return {v: np.array(d) for v, d in out.items()}, starts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="directory holding the three seed sweeps' out directories")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    rows = paired_differences(args.runs)
    for r in rows:
        r["sign_test_p"] = f"{sign_test(r['negative'], r['seeds']):.3f}"
    with open(os.path.join(args.out, "paired_differences.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(f"{r['sweep']:<22} {r['size'] + ' ' + r['variant']:<26} {r['loss']:<13} {r['differences']}  "
              f"mean {r['mean']} ± {r['se']} (se)")
    for label, sweeps in (("3 tokens per parameter", ("micro-scaling-seeds",)),
                          ("3 and 20 tokens per parameter", ("micro-scaling-seeds", "micro-scaling-tpp20-seeds"))):
        scaling = [r for r in rows if r["sweep"] in sweeps]
        negative, n = sum(r["negative"] for r in scaling), sum(r["seeds"] for r in scaling)
        print(f"scaling at {label}, all sizes: MoBA below full in {negative} of {n} seed pairs (sign test p = "
              f"{sign_test(negative, n):.4f})")

    diffs, starts = position_differences(args.runs)
    with open(os.path.join(args.out, "positions_minus_full.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["position_start"] + [f"{v}_{stat}" for v in diffs for stat in ("mean", "sd")])
        for i, start in enumerate(starts):
            writer.writerow([start] + [f"{x:.5f}" for v in diffs
                                       for x in (diffs[v][:, i].mean(), diffs[v][:, i].std(ddof=1))])

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (variant, d) in enumerate(diffs.items()):
        x = np.array(starts) + (i - len(diffs) / 2) * 6  # side by side within each bucket
        ax.errorbar(x, d.mean(axis=0), yerr=d.std(axis=0, ddof=1), marker="o", ms=4, capsize=3,
                    label=f"{variant} (mean ± sd over {len(d)} seeds)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("position (start of 128-token bucket)")
    ax.set_ylabel("eval loss minus full attention, same seed")
    ax.set_title("micro positions, 3 seeds: every variant minus full attention")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "positions_minus_full.png"), dpi=100)


if __name__ == "__main__":
    main()
