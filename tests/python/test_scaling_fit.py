"""scripts/scaling_fit.py: the least-squares fit in log-log space recovers a and b of points on a known power
law (with 0.1% multiplicative noise) within 1%, its bootstrap intervals bracket the estimate, and the CLI writes
JSON + PNG for each group."""
import csv
import json
import os
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import support  # noqa: E402

sys.path.insert(0, support.SCRIPTS)
import scaling_fit  # noqa: E402


class ScalingFit(unittest.TestCase):
    def test_recovers_a_and_b_within_one_percent(self):
        rng = np.random.default_rng(7)
        for a, b in ((2.625, -0.063), (1.546, -0.108), (40.0, -0.3)):
            compute = np.geomspace(1e18, 3e21, 5)
            loss = a * compute ** b * np.exp(rng.normal(0, 0.001, compute.size))
            fit_a, fit_b = scaling_fit.fit_power_law(compute, loss)
            self.assertLess(abs(fit_a / a - 1), 0.01, (a, b, fit_a, fit_b))
            self.assertLess(abs(fit_b / b - 1), 0.01, (a, b, fit_a, fit_b))
            boot = scaling_fit.bootstrap_intervals(compute, loss, samples=500)
            self.assertLess(boot["b"][0], fit_b)  # an interval of positive width around the estimate
            self.assertGreater(boot["b"][1], fit_b)

    def test_needs_two_distinct_compute_values(self):
        with self.assertRaises(ValueError):
            scaling_fit.fit_power_law([1e18, 1e18], [2.0, 2.1])

    def test_command_line_fits_each_group(self):
        out = support.scratch("scaling_fit")
        path = os.path.join(out, "points.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", "dense_flops", "val_loss"])
            for c in np.geomspace(1e15, 1e17, 4):
                w.writerow(["full", c, 3.0 * c ** -0.05])
                w.writerow(["moba", c, 3.1 * c ** -0.05])
        support.run([support.PYTHON, support.script("scaling_fit.py"), path, "--out", os.path.join(out, "fit"),
                     "--samples", "200"])
        with open(os.path.join(out, "fit.json")) as f:
            fits = json.load(f)
        self.assertAlmostEqual(fits["full"]["a"], 3.0, places=6)
        self.assertAlmostEqual(fits["moba"]["b"], -0.05, places=6)
        self.assertTrue(support.is_png(os.path.join(out, "fit.png")))
        message = support.run([support.PYTHON, support.script("scaling_fit.py"), path, "--out", out + "/x",
                               "--loss", "trailing_loss"], expect=1)
        self.assertIn("has no column trailing_loss", message)


if __name__ == "__main__":
    unittest.main()
