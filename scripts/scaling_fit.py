#!/usr/bin/env python3
"""Power-law fits of loss against compute, L(C) = a * C^b, by least squares on log L = log a + b log C
(scipy.stats.linregress), with percentile bootstrap intervals over the points, and the loss-vs-compute plot.

Used by scripts/sweep.py (fit); standalone on any CSV with a group column:
    scaling_fit.py results.csv --compute dense_flops --loss val_loss --group variant --out fit
writes fit.json and fit.png."""
import argparse
import csv
import json
import math
import sys

import numpy as np
from scipy import stats


def fit_power_law(compute, loss):
    """(a, b) of L = a * C^b, least squares in log-log space."""
    x, y = np.log(np.asarray(compute, float)), np.log(np.asarray(loss, float))
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("a power-law fit needs at least two distinct compute values")
    r = stats.linregress(x, y)
    return math.exp(r.intercept), r.slope


def bootstrap_intervals(compute, loss, samples=2000, level=0.95, seed=0):
    """Percentile intervals of a and b over fits to points resampled with replacement. Resamples with a single
    distinct compute value cannot be fitted and are drawn again; returns {"a": (lo, hi), "b": (lo, hi)}."""
    compute, loss = np.asarray(compute, float), np.asarray(loss, float)
    rng = np.random.default_rng(seed)
    fits = []
    while len(fits) < samples:
        idx = rng.integers(0, len(compute), len(compute))
        if np.ptp(compute[idx]) == 0:
            continue
        fits.append(fit_power_law(compute[idx], loss[idx]))
    fits = np.asarray(fits)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(fits, [tail, 100 - tail], axis=0)
    return {"a": (float(lo[0]), float(hi[0])), "b": (float(lo[1]), float(hi[1]))}


def fit_groups(rows, compute_key, loss_key, group_key, samples=2000, seed=0):
    """One fit per group of rows (dicts): {group: {"a", "b", "a_interval", "b_interval", "points"}}."""
    groups = {}
    for row in rows:
        c, l = row.get(compute_key), row.get(loss_key)
        if c in (None, "") or l in (None, "") or not math.isfinite(float(l)):
            continue
        groups.setdefault(row[group_key], []).append((float(c), float(l)))
    fits = {}
    for group, points in groups.items():
        if len({c for c, _ in points}) < 2:
            continue
        points.sort()
        cs, ls = zip(*points)
        a, b = fit_power_law(cs, ls)
        boot = bootstrap_intervals(cs, ls, samples=samples, seed=seed)
        fits[group] = {"a": a, "b": b, "a_interval": boot["a"], "b_interval": boot["b"], "points": points,
                       "compute": compute_key, "loss": loss_key}
    return fits


def describe_fit(name, fit):
    return (f"{name}: L = {fit['a']:.4g} * C^{fit['b']:.4f}  (95% bootstrap: a {fit['a_interval'][0]:.4g}.."
            f"{fit['a_interval'][1]:.4g}, b {fit['b_interval'][0]:.4f}..{fit['b_interval'][1]:.4f}; "
            f"{len(fit['points'])} points)")


def plot_fits(fits, path, title, compute_label):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, fit) in enumerate(sorted(fits.items())):
        color = f"C{i}"
        cs, ls = zip(*fit["points"])
        ax.plot(cs, ls, "o", color=color)
        grid = np.geomspace(min(cs), max(cs), 50)
        ax.plot(grid, fit["a"] * grid ** fit["b"], "-", color=color,
                label=f"{name}: {fit['a']:.3g} C^{fit['b']:.4f} [b {fit['b_interval'][0]:.3f}..{fit['b_interval'][1]:.3f}]")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(compute_label)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="CSV with a header row")
    ap.add_argument("--compute", default="dense_flops", help="compute column (default dense_flops = 6ND)")
    ap.add_argument("--loss", default="val_loss", help="loss column")
    ap.add_argument("--group", default="variant", help="one fit per distinct value of this column")
    ap.add_argument("--out", required=True, help="output prefix: PREFIX.json and PREFIX.png")
    ap.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    args = ap.parse_args()
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    missing = [k for k in (args.compute, args.loss, args.group) if rows and k not in rows[0]]
    if missing:
        print(f"error: {args.csv} has no column {', '.join(missing)} (columns: {', '.join(rows[0])})", file=sys.stderr)
        return 1
    fits = fit_groups(rows, args.compute, args.loss, args.group, samples=args.samples)
    if not fits:
        print(f"error: no group of {args.csv} has two distinct {args.compute} values to fit", file=sys.stderr)
        return 1
    for name, fit in sorted(fits.items()):
        print(describe_fit(name, fit))
    with open(args.out + ".json", "w") as f:
        json.dump(fits, f, indent=1)
    plot_fits(fits, args.out + ".png", f"{args.loss} vs {args.compute}", args.compute)
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
