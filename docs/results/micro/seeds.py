#!/usr/bin/env python3
"""The micro reproductions with 3 seeds each (recipes/micro/*-seeds.sweep.json; docs/results/micro/README.md,
"Seeds"): what one seed's noise is, against the differences the single-seed runs reported.

    seeds.py RUNS_DIR --out DIR
RUNS_DIR holds the out directories of the SWEEPS below (after `sweep.py collect`). Writes DIR/paired_differences.csv
(every run minus the reference of its own seed, with the sign test over seeds), DIR/positions_minus_full.csv and .png
(per position bucket, each variant minus full attention: mean and standard deviation over the seeds) and
DIR/locality_minus_full.png (the locality follow-up: MoBA and block-local attention minus full, per size and budget)
and DIR/positions_locality_minus_full.csv and .png (its position-wise part)."""
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
    # Follow-up: block-local attention (top_k 1) against full attention and against MoBA, at 3 and 20 tokens/parameter.
    ("micro-scaling-locality-seeds", "full", "val_loss"),
    ("micro-scaling-locality-seeds", "moba", "val_loss"),
    ("micro-scaling-tpp20-locality-seeds", "full", "val_loss"),
    ("micro-scaling-tpp20-locality-seeds", "moba", "val_loss"),
    ("micro-sft2k-fullpre-locality-seeds", "all-full", "val_loss"),  # block-local first layer / every layer in SFT
    ("micro-positions-locality-seeds", "full", "trailing_loss"),  # block-local 32 and 128 at context 1024
]
LOCALITY = {"micro-scaling-locality-seeds": "3 tokens/parameter", "micro-scaling-tpp20-locality-seeds": "20 tokens/parameter"}


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
            if variant == reference or (reference != "full" and variant == "full"):  # full - MoBA: MoBA - full negated
                continue
            seeds = sorted(s for (z, v, s) in value if (z, v) == (size, variant) and (size, reference, s) in value)
            diffs = np.array([value[(size, variant, s)] - value[(size, reference, s)] for s in seeds])
            rows.append({"sweep": sweep, "size": size, "variant": variant, "reference": reference, "loss": loss,
                         "seeds": len(diffs), "differences": " ".join(f"{d:+.4f}" for d in diffs),
                         "mean": f"{diffs.mean():+.4f}", "sd": f"{diffs.std(ddof=1):.4f}",
                         "se": f"{diffs.std(ddof=1) / math.sqrt(len(diffs)):.4f}",
                         "negative": int((diffs < 0).sum())})
    return rows


def position_differences(runs_dir, sweep_name="micro-positions-seeds"):
    """{variant: [seeds x buckets] of eval position loss minus full's of the same seed}, bucket starts."""
    sweep = os.path.join(runs_dir, sweep_name)
    curves, starts = {}, None
    for path in sorted(os.listdir(os.path.join(sweep, "eval"))):
        if not path.endswith(".json"):
            continue
        with open(os.path.join(sweep, "eval", path)) as f:
            result = json.load(f)
        run = result["name"].removeprefix(f"{sweep_name}-d64-l4-")
        variant, seed = run.rsplit("-s", 1)
        curves[(variant, seed)] = np.array(result["position_loss"])
        starts = [i * result["bucket"] for i in range(len(result["position_loss"]))]
    out = {}
    for (variant, seed), curve in sorted(curves.items()):
        if variant != "full":
            out.setdefault(variant, []).append(curve - curves[("full", seed)])
    return {v: np.array(d) for v, d in out.items()}, starts


def plot_positions(diffs, starts, title, path):
    """Per position bucket, each variant minus full attention (mean ± sd over seeds), as CSV and PNG."""
    import matplotlib.pyplot as plt
    with open(path + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["position_start"] + [f"{v}_{stat}" for v in diffs for stat in ("mean", "sd")])
        for i, start in enumerate(starts):
            writer.writerow([start] + [f"{x:.5f}" for v in diffs
                                       for x in (diffs[v][:, i].mean(), diffs[v][:, i].std(ddof=1))])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (variant, d) in enumerate(diffs.items()):
        x = np.array(starts) + (i - len(diffs) / 2) * 6  # side by side within each bucket
        ax.errorbar(x, d.mean(axis=0), yerr=d.std(axis=0, ddof=1), marker="o", ms=4, capsize=3,
                    label=f"{variant} (mean ± sd over {len(d)} seeds)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("position (start of 128-token bucket)")
    ax.set_ylabel("eval loss minus full attention, same seed")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".png", dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="directory holding the out directories of the sweeps in SWEEPS")
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
        print(f"{r['sweep']:<22} {r['size'] + ' ' + r['variant'] + ' - ' + r['reference']:<30} {r['loss']:<13} {r['differences']}  "
              f"mean {r['mean']} ± {r['se']} (se)")
    for label, sweeps, variant, reference in (
            ("3 tokens per parameter", ("micro-scaling-seeds",), "moba", "full"),
            ("3 and 20 tokens per parameter", ("micro-scaling-seeds", "micro-scaling-tpp20-seeds"), "moba", "full"),
            *((f"{budget}, locality runs", (sweep,), v, ref) for sweep, budget in LOCALITY.items()
              for v, ref in (("local16", "full"), ("local64", "full"), ("local16", "moba"), ("local64", "moba")))):
        scaling = [r for r in rows if r["sweep"] in sweeps and r["variant"] == variant and r["reference"] == reference]
        negative, n = sum(r["negative"] for r in scaling), sum(r["seeds"] for r in scaling)
        print(f"scaling at {label}, all sizes: {variant} below {reference} in {negative} of {n} seed pairs "
              f"(sign test p = {sign_test(negative, n):.4f})")

    import matplotlib
    matplotlib.use("Agg")
    diffs, starts = position_differences(args.runs)
    plot_positions(diffs, starts, "micro positions, 3 seeds: every variant minus full attention",
                   os.path.join(args.out, "positions_minus_full"))
    diffs, starts = position_differences(args.runs, "micro-positions-locality-seeds")
    plot_positions(diffs, starts, "micro positions, 3 seeds: MoBA and block-local attention minus full attention",
                   os.path.join(args.out, "positions_locality_minus_full"))
    plot_locality(rows, os.path.join(args.out, "locality_minus_full.png"))


def plot_locality(rows, path):
    """Per size, MoBA and block-local attention minus full attention (mean ± se over seeds), one panel per budget."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(LOCALITY), figsize=(10, 4), sharey=True)
    for ax, (sweep, budget) in zip(axes, LOCALITY.items()):
        mine = [r for r in rows if r["sweep"] == sweep and r["reference"] == "full"]
        sizes = list(dict.fromkeys(r["size"] for r in mine))
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        for i, variant in enumerate(variants):
            got = {r["size"]: r for r in mine if r["variant"] == variant}
            x = np.arange(len(sizes)) + (i - (len(variants) - 1) / 2) * 0.2
            ax.errorbar(x, [float(got[z]["mean"]) for z in sizes], yerr=[float(got[z]["se"]) for z in sizes],
                        marker="o", ms=4, capsize=3, ls="none", label=variant)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_title(budget)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val loss minus full, same seed (mean ± se)")
    axes[0].legend(fontsize=8, title="B 16 k 3 = moba; own block only: local16 (B 16), local64 (B 64)",
                   title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
