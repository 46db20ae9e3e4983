#!/usr/bin/env python3
"""Sweeps of `moba train` runs from one template recipe: sizes x attention variants, planned, written, launched,
collected, fitted and plotted. Every step reads its state from the files the previous ones left (recipes,
checkpoints, metrics.jsonl, eval JSON), so running a step again after a crash continues where it stopped.

    sweep.py plan     SPEC   # sizes each run with `moba plan`, writes RECIPES/<run>.yaml and OUT/plan.csv
                             # (--bench JSONL: expected hours from `moba bench train` FLOP rates)
    sweep.py run      SPEC   # plan, then `moba train` each unfinished run in turn, then `moba eval` them
    sweep.py commands SPEC   # plan, then print the launch lines of unfinished runs (--launcher, --sbatch)
    sweep.py collect  SPEC   # OUT/results.csv and .jsonl: N, D, FLOPs, final validation, eval losses
    sweep.py fit      SPEC   # L(C) = a C^b per variant with bootstrap intervals: OUT/fit.json, OUT/scaling.png
    sweep.py all      SPEC   # run, collect, fit (fit only with two or more sizes)

SPEC is JSON (paths relative to the current directory, normally the repository root):
    {"name": "mini-scaling", "template": "recipes/mini/scaling.yaml", "out": "runs/mini-scaling",
     "recipes": "recipes/mini/scaling",             # where the run recipes go (optional; default OUT/recipes)
     "set": {"data.train": "...", ...},            # recipe overrides for every run (optional)
     "tokens_per_parameter": 20,                    # D = this x N (non-embedding), whole steps (optional:
                                                    # without it train.tokens comes from the recipe)
     "sizes":    [{"name": "s1", "set": {"model.d_model": 256, ...}}, ...],
     "variants": [{"name": "full", "set": {"attention.mode": "full"}}, ...],
     "reference": "full",                           # variant the others are compared with (optional)
     "seeds": [1, 2, 3],                            # repeat every run with these seeds (optional): runs are
                                                    # named <size>-<variant>-s<seed>; collect adds summary.csv
     "eval": {"data": "...val.h5", "seq_len": 8192, "bucket": 1024, "trailing": 1024}   # optional
    }
A run is <size>-<variant> (-s<seed> with "seeds"); its recipe name is <name>-<size>-<variant> and its run directory OUT/runs/<run>.
Override values are JSON, which is YAML: {"attention.moba": {"block_size": 512, "top_k": 3}} works."""
import argparse
import csv
import statistics
import glob
import json
import math
import os
import shlex
import subprocess
import sys



class SweepError(Exception):
    pass


# ---- the spec and the plan ---------------------------------------------------------------------------------

def load_spec(path):
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as e:
        raise SweepError(f"cannot read {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        raise SweepError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}")
    for key in ("name", "template", "out", "sizes", "variants"):
        if key not in spec:
            raise SweepError(f"{path}: missing \"{key}\" (see `sweep.py --help` for the format)")
    allowed = {"name", "template", "out", "recipes", "set", "tokens_per_parameter", "sizes", "variants", "reference", "eval",
               "seeds", "comment"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    for group in ("sizes", "variants"):
        names = [item.get("name") for item in spec[group]]
        if not names or any(not n for n in names) or len(set(names)) != len(names):
            raise SweepError(f"{path}: every entry of \"{group}\" needs a distinct \"name\"")
    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                              or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)):
        raise SweepError(f"{path}: \"seeds\" must be a list of distinct non-negative integers, e.g. [1, 2, 3]")
    if not os.path.exists(spec["template"]):
        raise SweepError(f"{path}: template {spec['template']} not found (paths are relative to the current "
                         f"directory: run from the repository root)")
    spec["_path"] = path
    return spec


def apply_command_line(spec, args):
    """--set, --tokens-per-parameter and --eval of the command line win over the spec (e.g. a CPU dry run)."""
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SweepError(f"--set {item}: expected KEY=VALUE (YAML value), e.g. --set backend=cpu")
        spec.setdefault("_command_line_set", []).append((key, value))
    if args.tokens_per_parameter is not None:
        spec["tokens_per_parameter"] = args.tokens_per_parameter
    for item in args.eval:
        key, sep, value = item.partition("=")
        if not sep or "eval" not in spec:
            raise SweepError(f"--eval {item}: expected KEY=VALUE for a spec with an \"eval\" section")
        spec["eval"][key] = value


def set_args(overrides):
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def moba_plan(moba, template, overrides, write=None, raw_sets=()):
    cmd = [moba, "plan", template] + set_args(overrides)
    for key, value in raw_sets:  # command-line --set values, already YAML
        cmd += ["--set", f"{key}={value}"]
    cmd += ["--write", write] if write else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SweepError(f"`{shlex.join(cmd)}` failed:\n{proc.stderr.strip()}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def load_bench(path, moba):
    """`moba bench train` JSON lines, each with the FLOP rate it achieved counted as `moba plan` counts (6N plus
    the attended pairs, for the benchmarked recipe with the command's --set overrides and no phases)."""
    records = []
    if not path:
        return records
    with open(path) as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            if record.get("bench") != "train":
                continue
            words = shlex.split(record["command"])
            sets = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]
            sets += ["phases=[]", f"train.tokens={record['global_batch_tokens']}"]
            cmd = [moba, "plan", record["recipe"]] + [arg for s_ in sets for arg in ("--set", s_)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SweepError(f"--bench {path}: cannot plan the benchmarked recipe: {proc.stderr.strip()}")
            cost = json.loads(proc.stdout.splitlines()[-1])
            record["flops_per_s"] = record["tokens_per_s"] * cost["flops"] / cost["tokens"]
            records.append(record)
    return records


def matching_bench(records, recipe, cost):
    """The newest record of this very recipe, else of the same seq_len and (dominant) attention, else of the same
    seq_len; None if none."""
    kind = "full" if cost["attention_flops"] >= cost["attention_flops_full"] else "moba"
    for match in (lambda r: os.path.normpath(r["recipe"]) == os.path.normpath(recipe),
                  lambda r: r["seq"] == cost["seq_len"] and r["attention"] == kind,
                  lambda r: r["seq"] == cost["seq_len"]):
        for record in reversed(records):
            if match(record):
                return record
    return None


def plan_runs(spec, moba, quiet=False, bench=None):
    """Plans every run (idempotent): returns a list of dicts with the run's name, paths and `moba plan` cost, plus
    the expected hours when `bench` (load_bench) holds a matching `moba bench train` record (matching_bench)."""
    out = spec["out"]
    recipes = spec.get("recipes", os.path.join(out, "recipes"))
    os.makedirs(recipes, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    runs = []
    for size, variant, seed in ((z, v, x) for z in spec["sizes"] for v in spec["variants"]
                                for x in spec.get("seeds", [None])):
        run = f"{size['name']}-{variant['name']}" + ("" if seed is None else f"-s{seed}")
        overrides = dict(spec.get("set", {}))
        overrides.update(size.get("set", {}))
        overrides.update(variant.get("set", {}))
        if seed is not None:
            overrides["seed"] = seed
        overrides["name"] = f"{spec['name']}-{run}"
        overrides["run_dir"] = os.path.join(out, "runs", run)
        if "tokens_per_parameter" in spec:
            sizing = moba_plan(moba, spec["template"], overrides, raw_sets=spec.get("_command_line_set", ()))
            batch = sizing["global_batch_tokens"]
            steps = math.ceil(spec["tokens_per_parameter"] * sizing["non_embedding_parameters"] / batch)
            overrides["train.tokens"] = steps * batch
        recipe = os.path.join(recipes, run + ".yaml")
        cost = moba_plan(moba, spec["template"], overrides, write=recipe,
                         raw_sets=spec.get("_command_line_set", ()))
        measured = matching_bench(bench or [], recipe, cost)
        if measured:
            cost["flops_per_s"] = measured["flops_per_s"]
            cost["expected_hours"] = cost["flops"] / measured["flops_per_s"] / 3600
        add_header(recipe, spec, cost, measured)
        runs.append({**cost, "run": run, "size": size["name"], "variant": variant["name"], "seed": seed,
                     "recipe": recipe, "run_dir": overrides["run_dir"]})
    write_table(os.path.join(out, "plan.csv"), runs, PLAN_COLUMNS)
    if not quiet:
        print(f"[sweep] planned {len(runs)} runs of {spec['_path']} into {recipes} (table: {out}/plan.csv)")
        for r in runs:
            print(f"  {r['run']:<24} N {r['non_embedding_parameters']:>13,}  D {r['tokens']:>16,.0f}  "
                  f"6ND {r['dense_flops']:.3e}  +attention {r['attention_flops']:.3e}  ({r['attention']})")
    return runs


PLAN_COLUMNS = ["run", "size", "variant", "seed", "recipe", "run_dir", "non_embedding_parameters", "parameters", "seq_len",
                "global_batch_tokens", "steps", "tokens", "dense_flops", "attention_flops", "attention_flops_full",
                "flops", "attention", "flops_per_s", "expected_hours"]


def add_header(recipe, spec, cost, measured=None):
    """Prepends what the run costs to the written recipe (comments; the YAML itself is `moba plan`'s)."""
    with open(recipe) as f:
        body = f.read()
    header = [f"# Run {cost['name']} of sweep {spec['_path']} (written by scripts/sweep.py plan).",
              f"# {cost['non_embedding_parameters']:,} non-embedding parameters"
              + (f" ({cost['parameters']:,} in all)" if cost.get("parameters") else "")
              + f"; {cost['tokens']:,.0f} tokens in {cost['steps']:,} steps of {cost['global_batch_tokens']:,}.",
              f"# FLOPs: 6ND {cost['dense_flops']:.4g}; attention {cost['attention_flops']:.4g} "
              f"(all-full {cost['attention_flops_full']:.4g}); total {cost['flops']:.4g}.",
              f"# Attention: {cost['attention']}."]
    if measured:
        same = os.path.normpath(measured["recipe"]) == os.path.normpath(recipe)
        device = measured["device"].removeprefix("cuda (").removesuffix(")")  # "cuda (NVIDIA H200)" -> the GPU
        header.append(f"# Expected time on one {device}: {cost['expected_hours']:,.1f} hours at "
                      f"{measured['flops_per_s'] / 1e12:,.0f} TFLOP/s (counted as above), the rate measured "
                      + ("on this recipe" if same else f"on {measured['recipe']} ({measured['attention']} attention)")
                      + f" by `{measured['command']}` "
                      f"({measured['tokens_per_s']:,} tokens/s, peak {measured['peak_gib']:.1f} GiB; "
                      f"{measured['commit']}, {measured['date']}).")
    with open(recipe + ".tmp", "w") as f:
        f.write("\n".join(header) + "\n" + body)
    os.replace(recipe + ".tmp", recipe)


def write_table(path, rows, columns):
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    os.replace(path + ".tmp", path)


# ---- state read back from the run directories -----------------------------------------------------------

def final_checkpoint(run):
    """The checkpoint `moba train` leaves at the last step: a step_N/ directory (step_N.h5 before format 2)."""
    path = os.path.join(run["run_dir"], "checkpoints", f"step_{run['steps']:08d}")
    return path + ".h5" if os.path.exists(path + ".h5") else path


def is_trained(run):
    return os.path.exists(final_checkpoint(run))


def final_validation(run):
    """The validation loss logged at the last step, or None."""
    path = os.path.join(run["run_dir"], "metrics.jsonl")
    if not os.path.exists(path):
        return None
    value = None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("step") == run["steps"] and row.get("val_loss") is not None:
                value = row["val_loss"]
    return value


def eval_path(spec, run):
    e = spec["eval"]
    mode = e.get("attention", "as-trained")
    return os.path.join(spec["out"], "eval", f"eval_{run['name']}_step{run['steps']}_{mode}_N{e['seq_len']}.json")


def eval_args(spec):
    e = spec["eval"]
    unknown = sorted(set(e) - {"data", "seq_len", "bucket", "trailing", "attention", "max_docs", "batch_seqs"})
    if unknown or "data" not in e or "seq_len" not in e:
        raise SweepError(f"{spec['_path']}: \"eval\" needs data and seq_len; allowed keys: data, seq_len, bucket, "
                         f"trailing, attention, max_docs, batch_seqs" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    args = ["--data", e["data"], "--seq-len", str(e["seq_len"]), "--out", os.path.join(spec["out"], "eval")]
    for key, flag in (("bucket", "--bucket"), ("trailing", "--trailing"), ("attention", "--attention"),
                      ("max_docs", "--max-docs"), ("batch_seqs", "--batch-seqs")):
        if key in e:
            args += [flag, str(e[key])]
    return args


# ---- launching -----------------------------------------------------------------------------------------------

def train_command(run, moba, launcher):
    return shlex.split(launcher) + [moba, "train", run["recipe"]]


def run_logged(cmd, log_path):
    """Runs cmd with stdout+stderr appended to log_path and echoed; returns the exit code."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write(line)
        return proc.wait()


def selected(runs, only):
    if not only:
        return runs
    names = set(only.split(","))
    unknown = names - {r["run"] for r in runs}
    if unknown:
        raise SweepError(f"--only: no run named {', '.join(sorted(unknown))} (runs: {', '.join(r['run'] for r in runs)})")
    return [r for r in runs if r["run"] in names]


def command_run(spec, args):
    runs = selected(plan_runs(spec, args.moba), args.only)
    failed = []
    for run in runs:
        if is_trained(run):
            print(f"[sweep] {run['run']}: finished ({final_checkpoint(run)}), skipped")
            continue
        print(f"[sweep] {run['run']}: training ({run['recipe']})", flush=True)
        log = os.path.join(spec["out"], "logs", run["run"] + ".log")
        rc = run_logged(train_command(run, args.moba, args.launcher), log)
        if rc != 0 or not is_trained(run):  # go on with the others; the run is reported below
            print(f"[sweep] {run['run']}: FAILED, `moba train` exited with {rc} (log: {log})", flush=True)
            failed.append(f"{run['run']} (log: {log})")
        elif "eval" in spec:  # right away, so a sweep cut short keeps the evaluations of what it trained
            failed += evaluate(spec, [run], args)
    if "eval" in spec:
        pending = [r for r in runs if is_trained(r) and not os.path.exists(eval_path(spec, r))]
        if pending:  # runs trained before (one `moba eval` call for all of them)
            failed += evaluate(spec, pending, args)
        elif all(is_trained(r) for r in runs):
            print("[sweep] evaluations: all present")
    if failed:
        raise SweepError(f"{len(failed)} run(s) failed: {'; '.join(failed)}. Fix the cause and run the same command "
                         f"again: finished runs are skipped and the others resume from their checkpoints")
    return runs


def evaluate(spec, runs, args):
    """`moba eval` of the runs' final checkpoints in one call; returns the failures to report."""
    cmd = shlex.split(args.launcher) + [args.moba, "eval"]
    for r in runs:
        cmd += ["--checkpoint", final_checkpoint(r)]
    cmd += eval_args(spec)
    print(f"[sweep] evaluating {', '.join(r['run'] for r in runs)}", flush=True)
    log = os.path.join(spec["out"], "logs", "eval.log")
    rc = run_logged(cmd, log)
    return [] if rc == 0 else [f"evaluation of {', '.join(r['run'] for r in runs)} (log: {log})"]


def command_commands(spec, args):
    runs = selected(plan_runs(spec, args.moba, quiet=True), args.only)
    for run in runs:
        if is_trained(run):
            continue
        line = shlex.join(train_command(run, args.moba, args.launcher))
        if args.sbatch is not None:
            log = os.path.join(spec["out"], "logs", run["run"] + ".%j.log")
            line = (f"sbatch {args.sbatch} --job-name={shlex.quote(run['name'])} --output={shlex.quote(log)} "
                    f"--wrap={shlex.quote(line)}").replace("  ", " ")
        print(line)
    if "eval" in spec:
        pending = [r for r in runs if not os.path.exists(eval_path(spec, r))]
        if pending:
            cmd = shlex.split(args.launcher) + [args.moba, "eval"]
            for r in pending:
                cmd += ["--checkpoint", final_checkpoint(r)]
            print("# after training:", shlex.join(cmd + eval_args(spec)))


# ---- collecting and fitting ----------------------------------------------------------------------------------

RESULT_COLUMNS = ["run", "size", "variant", "seed", "non_embedding_parameters", "tokens", "dense_flops", "attention_flops",
                  "flops", "val_loss", "eval_mean_loss", "trailing_loss", "ratio_to_reference", "attention",
                  "trained"]


def collect(spec, moba, quiet=False):
    runs = plan_runs(spec, moba, quiet=True)
    rows = []
    for run in runs:
        row = {k: run[k] for k in ("run", "size", "variant", "seed", "non_embedding_parameters", "tokens",
                                   "dense_flops", "attention_flops", "flops", "attention")}
        row["trained"] = is_trained(run)
        row["val_loss"] = final_validation(run)
        row["eval_mean_loss"] = row["trailing_loss"] = None
        if "eval" in spec and os.path.exists(eval_path(spec, run)):
            with open(eval_path(spec, run)) as f:
                result = json.load(f)
            row["eval_mean_loss"], row["trailing_loss"] = result["mean_loss"], result["trailing_loss"]
        rows.append(row)
    reference = spec.get("reference")
    if reference:  # the reference run of the same size and seed
        ref = {(r["size"], r["seed"]): r["val_loss"] for r in rows if r["variant"] == reference}
        for r in rows:
            if r["val_loss"] is not None and ref.get((r["size"], r["seed"])):
                r["ratio_to_reference"] = r["val_loss"] / ref[(r["size"], r["seed"])]
    out = spec["out"]
    write_table(os.path.join(out, "results.csv"), rows, RESULT_COLUMNS)
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if not quiet:
        print(f"[sweep] {sum(r['trained'] for r in rows)}/{len(rows)} runs trained; wrote {out}/results.csv, "
              f"{out}/results.jsonl")
        for r in rows:
            cells = [f"{r['run']:<24}", f"val {fmt(r['val_loss'])}", f"trailing {fmt(r['trailing_loss'])}"]
            if r.get("ratio_to_reference") is not None:
                cells.append(f"/{reference} {r['ratio_to_reference']:.4f}")
            print("  " + "  ".join(cells))
    if "seeds" in spec:
        summarize_seeds(rows, reference, os.path.join(out, "summary.csv"), quiet)
    return rows


SUMMARY_COLUMNS = ["size", "variant", "loss", "seeds", "mean", "sd", "reference_seeds", "mean_difference",
                   "sd_difference", "se_difference"]


def summarize_seeds(rows, reference, path, quiet):
    """Per size, variant and loss, over the seeds: mean and sample standard deviation and, paired by seed, the
    difference to the reference variant (mean, sd, standard error). The seed-to-seed spread is one run's noise."""
    def spread(values):
        return statistics.stdev(values) if len(values) > 1 else None
    summary = []
    for loss in ("val_loss", "trailing_loss"):
        by_run = {(r["size"], r["variant"], r["seed"]): r[loss] for r in rows if r[loss] is not None}
        for size, variant in dict.fromkeys((r["size"], r["variant"]) for r in rows):
            values = {seed: v for (z, w, seed), v in by_run.items() if (z, w) == (size, variant)}
            if not values:
                continue
            row = {"size": size, "variant": variant, "loss": loss, "seeds": len(values),
                   "mean": statistics.fmean(values.values()), "sd": spread(list(values.values()))}
            diffs = [v - by_run[(size, reference, seed)] for seed, v in values.items()
                     if variant != reference and (size, reference, seed) in by_run]
            if diffs:
                sd = spread(diffs)
                row.update(reference_seeds=len(diffs), mean_difference=statistics.fmean(diffs), sd_difference=sd,
                           se_difference=None if sd is None else sd / math.sqrt(len(diffs)))
            summary.append(row)
    write_table(path, summary, SUMMARY_COLUMNS)
    if not quiet:
        print(f"[sweep] over the seeds, mean ± sd, and minus {reference} paired by seed: {path}")
        for r in summary:
            cells = [f"{r['size'] + '-' + r['variant']:<22}", f"{r['loss']:<13}", f"n {r['seeds']}",
                     f"{r['mean']:.4f} ± {fmt(r['sd'])}"]
            if r.get("mean_difference") is not None:
                cells.append(f"minus {reference}: {r['mean_difference']:+.4f} ± {fmt(r['sd_difference'])} "
                             f"(se {fmt(r['se_difference'])})")
            print("  " + "  ".join(cells))
    return summary


def fmt(v):
    return "-" if v is None else f"{v:.4f}"


def command_fit(spec, args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import scaling_fit  # numpy and scipy are needed here only
    rows = collect(spec, args.moba, quiet=True)
    sizes = {r["size"] for r in rows if r[args.loss] is not None}
    if len(sizes) < 2:
        raise SweepError(f"fit needs {args.loss} of two or more sizes; have {len(sizes)} (run `sweep.py run` first)")
    fits = scaling_fit.fit_groups(rows, args.compute, args.loss, "variant", samples=args.samples)
    out = spec["out"]
    stem = os.path.join(out, "fit" if (args.compute, args.loss) == ("dense_flops", "val_loss")
                        else f"fit_{args.loss}_vs_{args.compute}")
    with open(stem + ".json", "w") as f:
        json.dump(fits, f, indent=1)
    label = {"dense_flops": "compute C = 6ND (FLOPs)", "flops": "compute C = 6ND + attention FLOPs"}.get(args.compute,
                                                                                                     args.compute)
    png = stem.replace(os.path.join(out, "fit"), os.path.join(out, "scaling"), 1) + ".png"
    scaling_fit.plot_fits(fits, png, f"{spec['name']}: {args.loss} vs compute", label)
    for name, fit in sorted(fits.items()):
        print(scaling_fit.describe_fit(name, fit))
    print(f"[sweep] wrote {stem}.json and {png}")
    return fits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["plan", "run", "commands", "collect", "fit", "all"])
    ap.add_argument("spec", help="sweep JSON (see above)")
    ap.add_argument("--moba", default="./build/moba", help="the moba binary (default ./build/moba)")
    ap.add_argument("--launcher", default="", help="prefix of every moba command, e.g. 'mpirun -np 8' or 'srun'")
    ap.add_argument("--sbatch", default=None, metavar="OPTIONS",
                    help="commands: wrap each line in `sbatch OPTIONS --job-name=.. --output=.. --wrap=..`")
    ap.add_argument("--bench", default="", metavar="JSONL",
                    help="plan: `moba bench train` records; each recipe's expected hours = its FLOPs / the FLOP rate "
                         "measured on it, or on a benchmarked recipe of the same seq_len and attention")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every run, after the spec's (e.g. --set backend=cpu for a dry run)")
    ap.add_argument("--tokens-per-parameter", type=float, default=None, help="override the spec's rule")
    ap.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE",
                    help="override an entry of the spec's eval section (e.g. --eval seq_len=512)")
    ap.add_argument("--only", default="", help="comma-separated run names (run, commands)")
    ap.add_argument("--compute", default="dense_flops", choices=["dense_flops", "flops"],
                    help="fit: compute axis, 6ND (default) or 6ND + attention FLOPs")
    ap.add_argument("--loss", default="val_loss", choices=["val_loss", "trailing_loss", "eval_mean_loss"],
                    help="fit: which loss")
    ap.add_argument("--samples", type=int, default=2000, help="fit: bootstrap resamples")
    args = ap.parse_args()
    if not os.path.exists(args.moba):
        print(f"error: {args.moba} not found; build first (./scripts/build.sh) or pass --moba", file=sys.stderr)
        return 1
    try:
        spec = load_spec(args.spec)
        apply_command_line(spec, args)
        if args.command == "plan":
            plan_runs(spec, args.moba, bench=load_bench(args.bench, args.moba))
        elif args.command == "run":
            command_run(spec, args)
        elif args.command == "commands":
            command_commands(spec, args)
        elif args.command == "collect":
            collect(spec, args.moba)
        elif args.command == "fit":
            command_fit(spec, args)
        else:
            command_run(spec, args)
            collect(spec, args.moba)
            if len(spec["sizes"]) >= 2:
                command_fit(spec, args)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
