"""How far guidance pulls under deterministic DDIM: the calibration of DDIM's default `pull: matched`,
and DDIM with 50 steps against DDPM with 100 steps on the reported attr+mask scenario.

    python benchmarks/ddim_pull.py                       # both parts (about 10 minutes on 2 CPU cores)
    python benchmarks/ddim_pull.py --part report --sets 2 --samples 16

calibrate: on held-out scenarios (colour + mask pairs that no reported scenario uses), TV distance of
DDPM-100 and of DDIM-50 with the step sizes multiplied by each candidate factor on the raw DDIM pull;
the chosen factor minimises the mean |TV(DDIM-50) - TV(DDPM-100)| over the scenarios and the combiners
(sum, dependent 1>2), ties to the smaller factor.  report: attr+mask, DDPM-100 against DDIM-50 under
each pull (raw, consistent, matched), TV mean [min, max] over seed sets, and the on-manifold rate.
Scale 0.5 for every condition (the quality benchmark's), adaptive step rule.  Prints a table and
writes --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from zmagic_core.app.bench.quality import SCENARIOS, build_energy, make_combiner
from zmagic_core.method.guidance import Condition
from zmagic_core.method.solvers import DDIMSolver, DDPMSolver
from zmagic_core.models.shapes import ShapesModel
from zmagic_core.models.shapes.evaluate import evaluate_samples
from zmagic_core.sampling.pipeline import Pipeline

HELD_OUT = [("green", "green circle left"), ("yellow", "yellow circle top")]
FACTORS = (0.15, 0.2, 0.25, 0.3, 0.5, 1.0)
METHODS = ("sum", "dep 1>2")


class FactorDDIM(DDIMSolver):
    """Deterministic DDIM with the step sizes times a fixed factor (1.0 = the raw pull)."""

    def __init__(self, factor: float):
        super().__init__(0.0, pull="raw")
        self.factor = factor

    def guidance_gain(self, abar_t, abar_next):
        return self.factor


def tv(world, conditions, method, solver, steps, scale, seeds) -> tuple[float, float]:
    energies = [build_energy(world, kind, options) for _, kind, options in conditions]
    names = [name for name, _, _ in conditions]
    conds = [Condition(n, e, "adaptive", scale) for n, e in zip(names, energies)]
    result = Pipeline(world, solver, make_combiner(method), conds, steps).run(seeds, batch_size=len(seeds),
                                                                               progress=False)
    summary = evaluate_samples(world, result.samples, energies, names)["summary"]
    return summary["tv_distance"], summary["on_manifold"]


def seed_sets(sets: int, samples: int, offset: int) -> list[list[int]]:
    return [list(range(offset + k * 1000, offset + k * 1000 + samples)) for k in range(sets)]


def calibrate(world, args, log) -> dict:
    rows, gaps = [], {f: [] for f in FACTORS}
    for colour, reference in HELD_OUT:
        conditions = [(colour, "attribute", {"attribute": "color", "value": colour}),
                      ("mask", "mask", {"reference": reference})]
        for method in METHODS:
            seeds = sum(seed_sets(args.sets, args.samples, 500), [])
            ddpm, _ = tv(world, conditions, method, DDPMSolver(), 100, args.scale, seeds)
            row = {"scenario": f"{colour} + mask {reference}", "method": method, "ddpm100": ddpm, "ddim50": {}}
            for f in FACTORS:
                value, on = tv(world, conditions, method, FactorDDIM(f), 50, args.scale, seeds)
                row["ddim50"][str(f)] = [value, on]
                gaps[f].append(abs(value - ddpm))
            rows.append(row)
            log(f"calibrate {row['scenario']} {method}: ddpm-100 {ddpm:.3f}; ddim-50 "
                + " ".join(f"x{f} {v[0]:.3f}/{v[1]:.2f}" for f, v in row["ddim50"].items()))
    mean_gap = {str(f): float(np.mean(g)) for f, g in gaps.items()}
    best = min(FACTORS, key=lambda f: (round(mean_gap[str(f)], 6), f))
    log("mean |TV(ddim-50) - TV(ddpm-100)| per factor: " + ", ".join(f"x{f} {v:.3f}" for f, v in mean_gap.items())
        + f"; chosen x{best}")
    return {"rows": rows, "mean_gap": mean_gap, "chosen": best}


def report(world, args, log) -> dict:
    scenario = next(s for s in SCENARIOS if s["name"] == "attr+mask")
    sets = seed_sets(args.sets, args.samples, 0)
    cases = [("ddpm-100", lambda: DDPMSolver(), 100)] + [
        (f"ddim-50 {pull}", (lambda pull=pull: DDIMSolver(0.0, pull=pull)), 50) for pull in ("raw", "consistent", "matched")]
    out = {}
    for method in METHODS:
        for label, make, steps in cases:
            values = [tv(world, scenario["conditions"], method, make(), steps, args.scale, s) for s in sets]
            tvs, ons = [v for v, _ in values], [o for _, o in values]
            out[f"{method} | {label}"] = {"tv": tvs, "on_manifold": ons}
            log(f"attr+mask {method:8s} {label:20s} TV {np.mean(tvs):.3f} [{min(tvs):.3f}, {max(tvs):.3f}]  "
                f"on-manifold {np.mean(ons):.2f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("all", "calibrate", "report"), default="all")
    p.add_argument("--sets", type=int, default=4, help="seed sets (report) / sets pooled (calibrate)")
    p.add_argument("--samples", type=int, default=32, help="samples per seed set")
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--json", default="ddim_pull.json")
    args = p.parse_args(argv)
    world = ShapesModel()
    start = time.time()

    def log(msg):
        print(msg, flush=True)

    results = {"scale": args.scale, "sets": args.sets, "samples": args.samples}
    if args.part in ("all", "calibrate"):
        results["calibrate"] = calibrate(world, args, log)
    if args.part in ("all", "report"):
        results["report"] = report(world, args, log)
    results["seconds"] = time.time() - start
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {args.json} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
