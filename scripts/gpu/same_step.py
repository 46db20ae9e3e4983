#!/usr/bin/env python3
"""One optimizer step from the same weights on 1 rank and on several: how far apart are the step's loss and gradient?

MoBA's top-k is discontinuous: two runs whose sums differ only in order (other rank counts, GPU atomics) route one
query differently after a few steps, and their loss curves then part. Comparing whole curves measures that chaos;
this compares one step from a shared checkpoint, which is what "N ranks equal 1 rank" means (the CPU tests do the
same: tests/test_context_parallel.cpp). The reference and the checked runs all resumed from the checkpoint at STEP
and took one step; `one-again` (1 rank, run twice) gives the GPU's own run-to-run noise.

    same_step.py WORK STEP OUT_JSONL COMMIT DEVICE LABEL REFERENCE RUN...

Each run's step STEP+1 is read from WORK/RUN: the loss and grad_norm (metrics.jsonl) and the gradient of that step,
recovered from AdamW's first moment: m' = b1 m + (1 - b1) g, so g = (m' - b1 m) / (1 - b1) with b1 = 0.9 (the
recipes' beta1). m is read from every shard file and put in arena order by its (bucket, begin) ranges, so runs
with different ZeRO-1 shardings compare.
"""
import datetime
import glob
import json
import os
import sys

import h5py
import numpy as np

BETA1 = 0.9


def moments(checkpoint):
    pieces = []
    for path in sorted(glob.glob(os.path.join(checkpoint, "shard_*.h5"))):
        with h5py.File(path, "r") as f:
            ranges, m, at = f["ranges"][...], f["m"][...], 0
            for bucket, begin, numel in ranges:
                pieces.append((int(bucket), int(begin), m[at:at + numel]))
                at += numel
    pieces.sort(key=lambda p: (p[0], p[1]))
    return np.concatenate([p[2] for p in pieces]).astype(np.float64)


def step_record(run, step):
    for line in open(os.path.join(run, "metrics.jsonl")):
        r = json.loads(line)
        if r.get("step") == step and "loss" in r:
            return r
    raise SystemExit(f"{run}: no step {step} in metrics.jsonl")


def checkpoint(run, step):
    return os.path.join(run, "checkpoints", f"step_{step:08d}")


def main():
    work, step, out, commit, device, label, reference, *runs = sys.argv[1:]
    step = int(step)
    ref_run = os.path.join(work, reference)
    m_before = moments(checkpoint(ref_run, step)) if step > 0 else 0.0
    ref_g = (moments(checkpoint(ref_run, step + 1)) - BETA1 * m_before) / (1 - BETA1)
    ref = step_record(ref_run, step + 1)
    with open(out, "a") as f:
        for name in runs:
            run = os.path.join(work, name)
            got = step_record(run, step + 1)
            g = (moments(checkpoint(run, step + 1)) - BETA1 * m_before) / (1 - BETA1)
            rec = {"date": datetime.date.today().isoformat(), "commit": commit, "device": device,
                   "command": f"scripts/gpu/same_step.py ({label}: {name} vs {reference}, one step from step {step})",
                   "bench": "same_step", "label": label, "run": name, "reference": reference, "from_step": step,
                   "loss": got["loss"], "loss_reference": ref["loss"],
                   "rel_loss_diff": abs(got["loss"] - ref["loss"]) / ref["loss"],
                   "rel_grad_norm_diff": abs(got["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"],
                   "rel_l2_gradient_diff": float(np.linalg.norm(g - ref_g) / np.linalg.norm(ref_g))}
            f.write(json.dumps(rec) + "\n")
            print(f"{label:18} {name:22} from step {step:3}: loss {rec['rel_loss_diff']:.1e}, grad_norm "
                  f"{rec['rel_grad_norm_diff']:.1e}, gradient (rel L2) {rec['rel_l2_gradient_diff']:.1e}")


if __name__ == "__main__":
    main()
