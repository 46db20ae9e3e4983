"""scripts/sweep.py end to end on a 2-size CPU ladder (full and MoBA) on the bundled Python-docs sample: plan ->
run -> eval -> collect -> fit -> plot; a run interrupted mid-way resumes and finished runs are skipped; the launch
lines; and scripts/plot_positions.py overlaying the real `moba eval` results (PNG + CSV, trailing loss)."""
import csv
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import support  # noqa: E402


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def read_text(path):
    with open(path) as f:
        return f.read()


def training_steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if '"loss"' in line]


class Sweep(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch("sweep")
        cls.data = os.path.join(cls.dir, "data")
        support.run([support.MOBA, "prep", os.path.join(support.SOURCE, "data/sample/python-docs.jsonl.xz"),
                     "--out", cls.data, "--max-bytes", "1500000", "--val-fraction", "0.1", "--seed", "5"])
        cls.spec = os.path.join(cls.dir, "ladder.json")
        spec = {
            "name": "ladder", "template": os.path.join(support.SOURCE, "recipes/tests/tiny.yaml"),
            "out": os.path.join(cls.dir, "out"),
            "set": {"data.train": cls.data + "/train.h5", "data.val": cls.data + "/val.h5",
                    "attention.full_layers": "none", "eval.every_tokens": 0, "checkpoint.every_tokens": 4096,
                    "log.every_steps": 10},
            "tokens_per_parameter": 1,
            "sizes": [{"name": "s1", "set": {"model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 2,
                                             "model.n_layers": 1, "model.ffn_hidden": 0}},
                      {"name": "s2", "set": {"model.d_model": 48, "model.n_heads": 4, "model.n_kv_heads": 2,
                                             "model.n_layers": 2, "model.ffn_hidden": 0}}],
            "variants": [{"name": "full", "set": {"attention.mode": "full"}},
                         {"name": "moba", "set": {"attention.mode": "moba",
                                                  "attention.moba": {"block_size": 16, "top_k": 3}}}],
            "reference": "full",
            "eval": {"data": cls.data + "/val.h5", "seq_len": 128, "bucket": 32, "trailing": 32, "max_docs": 16},
        }
        with open(cls.spec, "w") as f:
            json.dump(spec, f)
        cls.out = spec["out"]

    def sweep(self, *args, expect=0):
        return support.run([support.PYTHON, support.script("sweep.py"), args[0], self.spec, "--moba", support.MOBA,
                            "--samples", "200"] + list(args[1:]), expect=expect)

    def test_ladder_end_to_end_with_a_crash_in_the_middle(self):
        # Plan: one recipe per run, whole steps of 1024 tokens, D = N rounded up.
        self.sweep("plan")
        plan = {r["run"]: r for r in read_csv(os.path.join(self.out, "plan.csv"))}
        self.assertEqual(sorted(plan), ["s1-full", "s1-moba", "s2-full", "s2-moba"])
        for run in plan.values():
            n, tokens = int(run["non_embedding_parameters"]), float(run["tokens"])
            self.assertEqual(tokens, int(run["steps"]) * 1024)
            self.assertTrue(n <= tokens < n + 1024, run)
            with open(run["recipe"]) as f:
                self.assertTrue(f.readline().startswith("# Run ladder-" + run["run"]))
        self.assertGreater(int(plan["s2-full"]["non_embedding_parameters"]),
                           3 * int(plan["s1-full"]["non_embedding_parameters"]))
        self.assertLess(float(plan["s1-moba"]["attention_flops"]), float(plan["s1-full"]["attention_flops"]))
        self.assertEqual(plan["s1-moba"]["dense_flops"], plan["s1-full"]["dense_flops"])
        # The written recipe is what moba trains: planning it again gives the same numbers.
        again = json.loads(support.run([support.MOBA, "plan", plan["s2-moba"]["recipe"]]).splitlines()[-1])
        self.assertEqual(again["tokens"], float(plan["s2-moba"]["tokens"]))

        # The launch lines name every unfinished run.
        lines = self.sweep("commands", "--launcher", "mpirun -np 2", "--sbatch", "-p cpu").splitlines()
        self.assertEqual(sum(line.startswith("sbatch -p cpu --job-name=ladder-") for line in lines), 4, lines)
        self.assertIn("--wrap='mpirun -np 2 ", lines[0])

        # One run finished, another killed after a checkpoint (as if the machine went away), then the whole sweep.
        self.sweep("run", "--only", "s1-full")
        support.run([support.MOBA, "train", plan["s2-moba"]["recipe"], "--max-steps", "3"])
        output = self.sweep("all")
        self.assertIn("s1-full: finished", output)
        self.assertIn("resumed from " + plan["s2-moba"]["run_dir"] + "/checkpoints/step_00000003", output)
        for run in plan.values():
            self.assertEqual(training_steps(run["run_dir"]), list(range(1, int(run["steps"]) + 1)), run["run"])
        self.assertEqual(sum(line.startswith("sbatch") for line in self.sweep("commands", "--sbatch", "").splitlines()), 0)

        # Collected: every run trained and evaluated; the bigger model (more tokens too) is better for both variants.
        results = {r["run"]: r for r in read_csv(os.path.join(self.out, "results.csv"))}
        for run in results.values():
            self.assertEqual(run["trained"], "True")
            for key in ("val_loss", "eval_mean_loss", "trailing_loss"):
                self.assertLess(float(run[key]), 4.8, (run["run"], key))  # uniform over 258 bytes is 5.55
        for variant in ("full", "moba"):
            self.assertLess(float(results[f"s2-{variant}"]["val_loss"]), float(results[f"s1-{variant}"]["val_loss"]))
        self.assertEqual(float(results["s1-full"]["ratio_to_reference"]), 1.0)
        with open(os.path.join(self.out, "results.jsonl")) as f:
            self.assertEqual(len(f.readlines()), 4)

        # Fitted per variant: loss falls with compute; the plot exists.
        with open(os.path.join(self.out, "fit.json")) as f:
            fits = json.load(f)
        self.assertEqual(sorted(fits), ["full", "moba"])
        for fit in fits.values():
            self.assertLess(fit["b"], 0)
            self.assertEqual(len(fit["points"]), 2)
        self.assertTrue(support.is_png(os.path.join(self.out, "scaling.png")))
        self.sweep("fit", "--compute", "flops", "--loss", "trailing_loss")
        self.assertTrue(support.is_png(os.path.join(self.out, "scaling_trailing_loss_vs_flops.png")))

        # Running again does nothing: every run and evaluation is found finished, no metrics line changes.
        metrics = {r: os.path.join(p["run_dir"], "metrics.jsonl") for r, p in plan.items()}
        before = {r: read_text(path) for r, path in metrics.items()}
        output = self.sweep("run")
        self.assertEqual(output.count(": finished"), 4, output)
        self.assertIn("evaluations: all present", output)
        self.assertEqual(before, {r: read_text(path) for r, path in metrics.items()})

        # The overlay of the real evaluations: PNG, one loss column per run, and the trailing losses as evaluated.
        evals = sorted(os.path.join(self.out, "eval", f) for f in os.listdir(os.path.join(self.out, "eval"))
                       if f.endswith(".json"))
        self.assertEqual(len(evals), 4)
        prefix = os.path.join(self.out, "overlay", "positions")
        support.run([support.PYTHON, support.script("plot_positions.py"), "--out", prefix] + evals)
        self.assertTrue(support.is_png(prefix + ".png"))
        rows = read_csv(prefix + ".csv")
        self.assertEqual([int(r["position_start"]) for r in rows], [0, 32, 64, 96])
        self.assertEqual(len(rows[0]), 2 + 4)
        summary = {r["label"]: r for r in read_csv(prefix + "_summary.csv")}
        self.assertEqual(sorted(summary), ["s1-full", "s1-moba", "s2-full", "s2-moba"])  # "ladder-" dropped
        for path in evals:
            with open(path) as f:
                result = json.load(f)
            label = result["name"][len("ladder-"):]
            self.assertAlmostEqual(float(summary[label]["trailing_loss"]), result["trailing_loss"], places=9)
            self.assertAlmostEqual(float(rows[-1][label]), result["position_loss"][-1], places=5)
            self.assertEqual(summary[label]["trailing_start"], "96")

    def test_seeds_repeat_every_run_and_are_summarised_paired(self):
        spec = {"name": "seeded", "template": os.path.join(support.SOURCE, "recipes/tests/tiny.yaml"),
                "out": os.path.join(self.dir, "seeded"),
                "set": {"data.train": self.data + "/train.h5", "data.val": self.data + "/val.h5",
                        "eval.every_tokens": 0, "checkpoint.every_tokens": 0, "train.tokens": 4096,
                        "model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 2, "model.n_layers": 1},
                "sizes": [{"name": "s1", "set": {}}],
                "variants": [{"name": "full", "set": {"attention.mode": "full"}},
                             {"name": "moba", "set": {"attention.mode": "moba", "attention.full_layers": "none"}}],
                "reference": "full", "seeds": [3, 4]}
        path = os.path.join(self.dir, "seeded.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        support.run([support.PYTHON, support.script("sweep.py"), "run", path, "--moba", support.MOBA])
        output = support.run([support.PYTHON, support.script("sweep.py"), "collect", path, "--moba", support.MOBA])
        out = spec["out"]
        plan = {r["run"]: r for r in read_csv(os.path.join(out, "plan.csv"))}
        self.assertEqual(sorted(plan), ["s1-full-s3", "s1-full-s4", "s1-moba-s3", "s1-moba-s4"])
        for run in plan.values():  # the seed is in the recipe moba trained, and in its checkpoint's settings
            self.assertIn(f"seed: {run['seed']}\n", read_text(run["recipe"]))
        results = {r["run"]: r for r in read_csv(os.path.join(out, "results.csv"))}
        loss = {name: float(r["val_loss"]) for name, r in results.items()}
        self.assertNotEqual(loss["s1-full-s3"], loss["s1-full-s4"])  # another seed: other weights and batches
        for seed in (3, 4):  # each MoBA run is compared with the full run of its own seed
            self.assertAlmostEqual(float(results[f"s1-moba-s{seed}"]["ratio_to_reference"]),
                                   loss[f"s1-moba-s{seed}"] / loss[f"s1-full-s{seed}"], places=12)
        summary = {(r["variant"], r["loss"]): r for r in read_csv(os.path.join(out, "summary.csv"))}
        full, moba = summary[("full", "val_loss")], summary[("moba", "val_loss")]
        self.assertEqual((full["seeds"], moba["seeds"], moba["reference_seeds"]), ("2", "2", "2"))
        self.assertAlmostEqual(float(full["mean"]), (loss["s1-full-s3"] + loss["s1-full-s4"]) / 2, places=12)
        self.assertAlmostEqual(float(full["sd"]), abs(loss["s1-full-s3"] - loss["s1-full-s4"]) / 2 ** 0.5, places=12)
        diffs = [loss[f"s1-moba-s{s}"] - loss[f"s1-full-s{s}"] for s in (3, 4)]
        self.assertAlmostEqual(float(moba["mean_difference"]), sum(diffs) / 2, places=12)
        self.assertAlmostEqual(float(moba["se_difference"]), abs(diffs[0] - diffs[1]) / 2, places=12)
        self.assertEqual(full["mean_difference"], "")  # the reference is not compared with itself
        self.assertIn("over the seeds", output)

    def test_bad_specs_are_clear_errors(self):
        bad = os.path.join(self.dir, "bad.json")
        with open(bad, "w") as f:
            json.dump({"name": "x", "template": "nowhere.yaml", "out": self.dir, "sizes": [], "variants": []}, f)
        message = support.run([support.PYTHON, support.script("sweep.py"), "plan", bad, "--moba", support.MOBA],
                              expect=1)
        self.assertIn("every entry of \"sizes\" needs a distinct \"name\"", message)
        with open(bad, "w") as f:
            f.write('{"name": "x",\n "sizes": [}')
        message = support.run([support.PYTHON, support.script("sweep.py"), "plan", bad, "--moba", support.MOBA],
                              expect=1)
        self.assertIn("bad.json:2:", message)
        for seeds in ([], [1, 1], [-1], "1,2"):
            with open(bad, "w") as f:
                json.dump({"name": "x", "template": os.path.join(support.SOURCE, "recipes/tests/tiny.yaml"),
                           "out": self.dir, "sizes": [{"name": "a"}], "variants": [{"name": "b"}], "seeds": seeds}, f)
            message = support.run([support.PYTHON, support.script("sweep.py"), "plan", bad, "--moba", support.MOBA],
                                  expect=1)
            self.assertIn("\"seeds\" must be a list of distinct non-negative integers", message)


if __name__ == "__main__":
    unittest.main()
