"""`zmagic bench quality`: every combiner on fixed shapes-world scenarios, against the exact oracle.

    zmagic bench quality --out docs              # the full run (docs/benchmarks.md, docs/benchmarks/)
    zmagic bench quality --quick --out /tmp/b    # ~30 min on 2 CPU cores, 25 of them the held-out sweeps
    zmagic bench quality --quick --scale 0.5 --staged-start 600 --travel 1 --out /tmp/b   # no sweep: ~5 min
    zmagic bench quality --samples 8 --steps 10 --scale 0.25 --scenarios attr+mask --out /tmp/q
    zmagic bench quality --combiners sum,cagrad:c=0.8,my-combiner   # combiners by registry name
    zmagic bench quality --replot --out docs     # no sampling: figures and section from quality.json
    zmagic bench quality --quick --tuned --out /tmp/b   # also each combiner at its own tuned scale

The report goes to ``--out DIR`` (default ./zmagic-bench): the section ``quality`` of
DIR/benchmarks.md, and figures and quality.json in DIR/benchmarks/.

``--combiners`` names combiners of the plugin registry (installed plugins included), comma
separated, each optionally with options (``name:key=value:key=value``); every scenario then runs
no guidance, each named combiner that accepts its number of conditions (labelled as written)
and the oracle.  Without it, each scenario runs its own list of the built-in combiners below.

Per scenario and method: joint satisfaction, per-condition final energy, on-manifold rate,
coverage and total variation to the exact conditional distribution, the cosine between the
method's combined guidance G and the exact grad log p(c_1..c_n | x_t) per band of timesteps, and
the energies over the steps.  Each figure is computed per seed set (disjoint fixed seeds); the
intervals are the min..max over the seed sets.

The exact gradient: the shapes world is a Gaussian mixture, so
grad log p(c | x_t) = s_cond(x_t, t) - s(x_t, t), with s_cond the score of the same mixture
reweighted by prod_i p(c_i | k) (``world.conditioned``).  A small wrapper around the combiner
records G at every step and compares it with that difference, at the same x_t and t.

The step size (FreeDoM's adaptive rule, the same scale for every condition and every method) is
chosen first by a sweep on held-out tuning scenarios, never on the reported ones (``--scale`` skips
the sweep).  ``--tuned`` also tunes each combiner's own scale on the tuning scenarios (app/tune.py's
beam search; objective: mean TV distance, constraint: on-manifold rate >= 0.95) and runs the
reported scenarios again at each one's own best scale: the page shows both side by side.
"""
from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from zmagic_core.app.bench.report import (DATA_NAME, CombinerSpec, add_out_argument, code, command, layout, machine,
                                          non_negative_int, now, parse_combiners, positive_float, positive_int,
                                          save_figure, version, write_section)
from zmagic_core.files.atomic import write_text
from zmagic_core.contracts.errors import ConfigError, InputError
from zmagic_core.method.combiners import CAGradCombiner, DependentCombiner, SumCombiner, cosine
from zmagic_core.contracts.components import Combiner
from zmagic_core.method.guidance import Condition
from zmagic_core.sampling.pipeline import Pipeline
from zmagic_core.models.shapes import AttributeEnergy, KeypointEnergy, MaskEnergy, ShapesFlowModel, ShapesModel, StyleEnergy
from zmagic_core.models.shapes.evaluate import evaluate_samples, target_log_weights
from zmagic_core.method.solvers import DDIMSolver, DDPMSolver

BANDS = ((1000, 700), (700, 400), (400, 100), (100, -1))  # t in [hi, lo): "t in [1000,700)", ..., "[100,0]"
BAND_NAMES = ("[1000,700)", "[700,400)", "[400,100)", "[100,0]")

STAGED = " staged"  # a label's suffix: the appearance conditions start late (see STAGE_SWEEP)
TRAVEL = " travel"  # a label's suffix: every step is repeated with time travel (FreeDoM's; see TRAVEL_SWEEP)
ROW_SUFFIXES = (STAGED, TRAVEL)  # they change the run's conditions, not the combiner; any order
LAYOUT_KINDS = ("mask", "keypoints")  # where the shape is: guided from the first step in a staged run
TWO_CONDITION_METHODS = ["none", "sum", "dep 1>2", "dep 2>1", "dep-noH 1>2", "dep-noH 2>1", "dep 1>2 autograd",
                         "dep 1>2 paper", "cagrad c=0", "cagrad c=0.5", "oracle"]
# the headline scenario only: CAGrad's exact modes and c = 0.8
ALL_METHODS = TWO_CONDITION_METHODS[:-1] + ["cagrad c=0.5 autograd", "cagrad c=0.5 paper", "cagrad c=0.8", "oracle"]
# layout + appearance scenarios also run these (appearance conditions guided only from the staged start down)
STAGED_METHODS = ["sum staged", "dep 1>2 staged", "cagrad c=0 staged", "cagrad c=0.5 staged"]

# -- scenarios -----------------------------------------------------------------------------------
# (name, kind, options); kinds: attribute (attribute, value), mask / keypoints / style (reference)
SCENARIOS = [
    {"name": "attr+mask", "methods": ALL_METHODS[:-1] + STAGED_METHODS + ["oracle"], "conditions": [("red", "attribute", {"attribute": "color", "value": "red"}),
                                          ("mask", "mask", {"reference": "red circle center"})],
     "why": "dependent: the mask is colour-blind and fixes shape and position, the classifier fixes the colour; "
            "both pull x_t towards the prototypes they share (only the red circle in the centre)"},
    {"name": "attr+style", "conditions": [("triangle", "attribute", {"attribute": "shape", "value": "triangle"}),
                                           ("style", "style", {"reference": "blue triangle top"})],
     "why": "dependent: the colour Gram matrix sees the colour (up to sign: blue ~ yellow) and the area, "
            "which depends on the shape"},
    {"name": "keypoints+mask", "conditions": [("kp", "keypoints", {"reference": "green square left"}),
                                               ("mask", "mask", {"reference": "green square left"})],
     "why": "strongly dependent (nearly redundant): the mask's centroid is the keypoint"},
    {"name": "indep: color+keypoints", "methods": TWO_CONDITION_METHODS[:-1] + STAGED_METHODS + ["oracle"],
     "conditions": [("red", "attribute", {"attribute": "color", "value": "red"}),
                                                       ("kp", "keypoints", {"reference": "red square top"})],
     "why": "(nearly) independent: the prior is a product over shape x colour x position, and the keypoint "
            "energy is exactly colour-blind (every colour is at the same distance from the grey background, "
            "so the soft mask, hence the centroid, ignores colour) while the colour classifier does not care "
            "where the shape is; they are independent given the prototype and a priori, and only weakly "
            "coupled given x_t"},
    {"name": "attr+mask (DDIM)", "solver": "ddim",
     "conditions": [("red", "attribute", {"attribute": "color", "value": "red"}),
                    ("mask", "mask", {"reference": "red circle center"})],
     "why": "the first scenario under deterministic DDIM (eta = 0) instead of ancestral sampling",
     "methods": ["none", "sum", "dep 1>2", "dep-noH 1>2", "dep 1>2 autograd", "dep 1>2 paper", "cagrad c=0.5",
                 "cagrad c=0.5 paper", "sum staged", "dep 1>2 staged", "oracle"]},
    {"name": "3 conditions", "conditions": [("circle", "attribute", {"attribute": "shape", "value": "circle"}),
                                             ("style", "style", {"reference": "blue circle center"}),
                                             ("kp", "keypoints", {"reference": "blue circle top"})],
     "why": "shape classifier + colour/area style + position keypoint: blue or yellow circles at the top",
     "methods": ["none", "sum", "cagrad c=0", "cagrad c=0.5", "cagrad c=0.5 autograd", "cagrad c=0.5 paper",
                 "sum staged", "cagrad c=0 staged", "cagrad c=0.5 staged", "sum travel", "cagrad c=0 travel",
                 "oracle"]},
    {"name": "4 conditions", "conditions": [("green", "attribute", {"attribute": "color", "value": "green"}),
                                             ("triangle", "attribute", {"attribute": "shape", "value": "triangle"}),
                                             ("mask", "mask", {"reference": "green triangle bottom"}),
                                             ("kp", "keypoints", {"reference": "green triangle bottom"})],
     "why": "colour + shape classifiers + mask + keypoint: only the green triangle at the bottom",
     "methods": ["none", "sum", "cagrad c=0", "cagrad c=0.5", "sum staged", "cagrad c=0 staged", "sum travel",
                 "cagrad c=0 travel", "oracle"]},
]

# held-out scenarios for the step-size sweep: other values and references than any reported one
TUNING = [
    {"name": "tune attr+mask", "conditions": [("blue", "attribute", {"attribute": "color", "value": "blue"}),
                                               ("mask", "mask", {"reference": "blue square top-left"})]},
    {"name": "tune attr+style", "conditions": [("square", "attribute", {"attribute": "shape", "value": "square"}),
                                                ("style", "style", {"reference": "green square top"})]},
    {"name": "tune keypoints+mask", "conditions": [("kp", "keypoints", {"reference": "red triangle bottom-right"}),
                                                    ("mask", "mask", {"reference": "red triangle bottom-right"})]},
]
SWEEP_SCALES = (0.1, 0.25, 0.5, 1.0)
SWEEP_METHODS = ("sum", "dep 1>2")
# --tuned: each of these gets its own scale on TUNING (built-in labels; --combiners: each named one), every point of
# the log grid tried: one parameter and 7 points, so an exhaustive search costs what a beam search would, and a
# noisy objective cannot stop it early (a beam moving up from 0.05 stopped after 3 points)
TUNED_METHODS = ("sum", "dep 1>2", "cagrad c=0.5")
TUNED_GRID = {"start": 0.05, "factor": 2.0, "maximum": 3.2}  # TFG's log grid: 0.05, 0.1, ..., 3.2
TUNED_ON_MANIFOLD = 0.95
# the defaults of the conditional term (the bound on the Hessian term, CAGrad's rescaling) are chosen on
# these: the tuning scenarios plus a held-out DDIM one
DEFAULTS_TUNING = TUNING + [
    {"name": "tune attr+style 2", "conditions": [("circle", "attribute", {"attribute": "shape", "value": "circle"}),
                                                  ("style", "style", {"reference": "red circle left"})]},
    {"name": "tune attr+mask (DDIM)", "solver": "ddim",
     "conditions": [("yellow", "attribute", {"attribute": "color", "value": "yellow"}),
                    ("mask", "mask", {"reference": "yellow triangle right"})]},
    {"name": "tune 3 conditions", "conditions": [("square", "attribute", {"attribute": "shape", "value": "square"}),
                                                  ("style", "style", {"reference": "yellow square center"}),
                                                  ("kp", "keypoints", {"reference": "yellow square bottom"})]},
]
# the staged start of the appearance conditions is chosen on these (every one mixes layout and appearance)
STAGE_TUNING = [DEFAULTS_TUNING[0], DEFAULTS_TUNING[-1],
                {"name": "tune color+keypoints", "conditions": [
                    ("yellow", "attribute", {"attribute": "color", "value": "yellow"}),
                    ("kp", "keypoints", {"reference": "yellow circle left"})]}]
STAGE_SWEEP = (None, 800, 700, 600, 500, 400)  # None: every condition from the first step (no staging)
STAGE_METHODS = ("sum", "cagrad c=0")
# the number of time-travel repeats of the `travel` rows is chosen on these: held-out sets of three and four
# conditions (other values and references than the reported 3- and 4-condition sets)
TRAVEL_TUNING = [DEFAULTS_TUNING[-1],
                 {"name": "tune 4 conditions", "conditions": [
                     ("yellow", "attribute", {"attribute": "color", "value": "yellow"}),
                     ("square", "attribute", {"attribute": "shape", "value": "square"}),
                     ("mask", "mask", {"reference": "yellow square left"}),
                     ("kp", "keypoints", {"reference": "yellow square left"})]},
                 {"name": "tune 4 conditions b", "conditions": [
                     ("blue", "attribute", {"attribute": "color", "value": "blue"}),
                     ("circle", "attribute", {"attribute": "shape", "value": "circle"}),
                     ("style", "style", {"reference": "blue circle top-right"}),
                     ("kp", "keypoints", {"reference": "blue circle top-right"})]}]
TRAVEL_SWEEP = (0, 1, 2)  # repeats per step: each costs one more step's work
TRAVEL_METHODS = ("sum", "cagrad c=0")
BOUND_SWEEP = (0.25, 1.0, 4.0, "none")
DERIVED_BOUND = 1.0  # what the no-overshoot argument gives (docs/method.md); ties in the sweep go to it
BOUND_METHODS = ("dep 1>2", "dep 2>1", "cagrad c=0.5")
RESCALE_SWEEP = ("none", "1/(1+c^2)", "1/(1+c)")
PROJECT_SWEEP = ("none", "hessian", "conditional")  # ties go to the first (the paper's update)
TERM_SWEEP = [(b, p) for b in BOUND_SWEEP for p in PROJECT_SWEEP]  # swept jointly: both act on g_{j|i}

METHOD_HELP = {
    "none": "no guidance (unconditional samples)",
    "sum": "G = sum_i g_i",
    "dep 1>2": "dependent (Algorithm 1) at its defaults, order (c1, c2): Hessian term on, J_Phi g_tilde by a forward "
               "difference, Hessian term bounded and without its score-direction component (docs/method.md)",
    "dep 2>1": "the same, order (c2, c1)",
    "dep-noH 1>2": "dependent without the Hessian term (g1 detached in x_hat)",
    "dep-noH 2>1": "the same, order (c2, c1)",
    "dep 1>2 autograd": "dependent with the exact vector-Jacobian product (double backward), same bound",
    "dep 1>2 paper": "the paper's exact update: exact product, no bound, no projection (product=autograd, bound=none, "
                     "project=none)",
    "cagrad c=0": "CAGrad over all ordered pairs at its defaults, c = 0 (mean of the pair gradients)",
    "cagrad c=0.5": "CAGrad, c = 0.5",
    "cagrad c=0.5 autograd": "CAGrad, c = 0.5, exact products, same bound and rescaling",
    "cagrad c=0.5 paper": "CAGrad, c = 0.5 as in the paper: exact products, no bound, no projection, no rescaling",
    "cagrad c=0.8": "CAGrad, c = 0.8",
    "oracle": "exact conditional model (mixture reweighted by prod_i p(c_i|k)), no guidance",
    **{m: f"`{m[:-len(STAGED)]}` with the appearance conditions (attribute, style) guiding only from the staged start "
          "down (section 'Staged guidance'), the layout ones (mask, keypoints) from the first step" for m in STAGED_METHODS},
    **{m: f"`{m[:-len(TRAVEL)]}` with time travel: every step repeated (back to level t by the forward process, then "
          "stepped again) as many times as section 'Time travel' says, for every condition"
       for m in ("sum travel", "cagrad c=0 travel")},
}


def build_energy(world: ShapesModel, kind: str, options: dict):
    if kind == "attribute":
        return AttributeEnergy(world, **options)
    if kind == "mask":
        return MaskEnergy(world, **options)
    if kind == "keypoints":
        return KeypointEnergy(world, **options)
    if kind == "style":
        return StyleEnergy(world, **options)
    raise ValueError(kind)


def split_label(method: str) -> tuple[str, set[str]]:
    """A label's combiner part and its row suffixes (ROW_SUFFIXES, in any order): 'sum travel staged' ->
    ('sum', {' staged', ' travel'})."""
    found: set[str] = set()
    while suffix := next((s for s in ROW_SUFFIXES if method.endswith(s)), None):
        method, found = method[:-len(suffix)], found | {suffix}
    return method, found


def make_combiner(method: str, **options) -> Combiner:
    """The built-in labels: 'sum', 'dep[-noH] 1>2|2>1 [autograd|paper]', 'cagrad c=X [autograd|paper]' (a ' staged'
    suffix changes the conditions' windows and a ' travel' suffix their repeats, not the combiner)."""
    method = split_label(method)[0]
    if method in ("none", "oracle", "sum"):
        return SumCombiner()
    words = method.split()
    if words[-1] == "autograd":
        options = {"product": "autograd", **options}
    elif words[-1] == "paper":
        options = {"product": "autograd", "bound": "none", "project": "none", **options}
        if method.startswith("cagrad"):
            options.setdefault("rescale", "none")
    if method.startswith("dep"):
        return DependentCombiner(hessian=not method.startswith("dep-noH"), **options)
    if method.startswith("cagrad c="):
        return CAGradCombiner(c=float(words[1].split("=", 1)[1]), **options)
    raise ValueError(f"unknown method {method!r}")


def method_order(method: str, n: int) -> list[int]:
    """The conditions' order for a built-in label ('... 2>1' reverses a pair)."""
    return [1, 0] if method.startswith("dep") and "2>1" in method.split() and n == 2 else list(range(n))


def band_of(t: int) -> int:
    """Index of the band of BANDS that holds timestep t."""
    for i, (_, lo) in enumerate(BANDS[:-1]):
        if t >= lo:
            return i
    return len(BANDS) - 1


class Recorder(Combiner):
    """Wraps a combiner; per step, the cosine between its G and the exact grad log p(c | x_t),
    and (a property of the conditions, not of the method) the cosine between the exact joint
    gradient and the sum of the exact single-condition gradients at the same x_t."""

    def __init__(self, inner: Combiner, world: ShapesModel, joint: ShapesModel, singles: list[ShapesModel]):
        self.inner, self.world, self.joint, self.singles = inner, world, joint, singles
        self.min_conditions, self.max_conditions = inner.min_conditions, inner.max_conditions
        self.cos_exact: dict[int, list[torch.Tensor]] = {}
        self.cos_dependence: dict[int, list[torch.Tensor]] = {}
        self.nonfinite = 0  # samples x steps where G was not finite (the pipeline then falls back)

    def combine(self, step):
        out = self.inner.combine(step)
        with torch.no_grad():
            x, t = step.x.detach(), step.t
            base = self.world.score(x, t)
            exact = self.joint.score(x, t) - base
            finite = torch.isfinite(out.guidance.flatten(1)).all(1)
            self.nonfinite += int((~finite).sum())
            cos = cosine(torch.nan_to_num(out.guidance), exact)
            self.cos_exact.setdefault(t, []).append(torch.where(finite, cos, torch.nan))
            if len(self.singles) > 1:
                marginal = sum(m.score(x, t) - base for m in self.singles)
                self.cos_dependence.setdefault(t, []).append(cosine(marginal, exact))
        return out


def run_method(world: ShapesModel, scenario: dict, method: str, seeds: list[int], scale: float, steps: int,
               batch_size: int, combiner: Optional[Callable[[], Combiner]] = None,
               order: Optional[list[int]] = None, stage: Optional[int] = None, travel: int = 0) -> dict:
    """One method on one scenario for one seed set; every figure from this run.  ``method`` is the
    label; ``combiner`` builds its combiner (default: ``make_combiner(method)``, the built-in labels);
    ``order``: the conditions' order (default: the built-in label's, else the scenario's); ``stage``: the
    appearance conditions (kinds other than LAYOUT_KINDS) guide only for t <= stage (None: every step); ``travel``:
    time-travel repeats of every step (every condition's ``time_travel``)."""
    energies = [build_energy(world, kind, opts) for _, kind, opts in scenario["conditions"]]
    names = [name for name, _, _ in scenario["conditions"]]
    joint = world.conditioned(target_log_weights(world, energies))
    singles = [world.conditioned(target_log_weights(world, [e])) for e in energies]
    if order is None:
        order = method_order(method, len(energies)) if combiner is None else list(range(len(energies)))
    guided = method not in ("none", "oracle")
    kinds = [kind for _, kind, _ in scenario["conditions"]]

    def start(i):
        if not guided:
            return -1
        return 10**6 if stage is None or kinds[i] in LAYOUT_KINDS else stage

    conditions = [Condition(names[i], energies[i], "adaptive", scale, start=start(i), time_travel=travel if guided else 0)
                  for i in order]
    recorder = Recorder(combiner() if combiner is not None else make_combiner(method), world, joint, singles)
    model = joint if method == "oracle" else world
    solver = DDIMSolver(0.0) if scenario.get("solver") == "ddim" else DDPMSolver()
    pipe = Pipeline(model, solver, recorder, conditions, steps)
    timesteps = pipe.schedule.timesteps
    energy_values: list[list[list[float]]] = [[[] for _ in range(steps)] for _ in names]  # [cond][step][sample]
    cond_cos: dict[str, np.ndarray] = {}
    cond_cos_n = np.zeros(steps)
    events = {"fallback": 0, "bounded": 0}  # sample-steps where the pipeline fell back / the bound cut the Hessian term

    def callback(info):
        i, x = info["step"], info["x"]
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        with torch.no_grad():  # energies of the base model's clean estimate at the new point
            if t_next >= 0:
                abar = float(world.alphas_cumprod[t_next])
                x0 = (x - math.sqrt(1 - abar) * world.eps(x, t_next)) / math.sqrt(abar)
            else:
                x0 = x
            for k, e in enumerate(energies):
                energy_values[k][i].extend(e(x0).tolist())
        for rec in info["record"]:
            events["fallback"] += "fallback" in rec
            events["bounded"] += rec.get("bounded", 0) > 0
            items = dict(rec.get("cosine", {}))
            if "cos(g1,g2|1)" in rec:
                items["g1~g2|1"] = rec["cos(g1,g2|1)"]
            for key, v in items.items():
                cond_cos.setdefault(key, np.zeros(steps))[i] += v
            cond_cos_n[i] += 1

    start = time.process_time()
    result = pipe.run(seeds, batch_size=batch_size, progress=False, callback=callback)
    cpu = time.process_time() - start
    ev = evaluate_samples(world, result.samples, energies, names)
    summary = ev["summary"]
    good = sum(s["joint"] and s["on_manifold"] for s in ev["samples"]) / max(len(ev["samples"]), 1)
    finite_energy, nonfinite_energy = {}, {}
    for n in names:  # a diverged sample (non-finite x0) would make the mean infinite: count it apart
        vals = [s["energy"][n] for s in ev["samples"]]
        ok = [v for v in vals if math.isfinite(v)]
        finite_energy[n] = float(np.mean(ok)) if ok else float("nan")
        nonfinite_energy[n] = len(vals) - len(ok)
    band_cos = [[] for _ in BANDS]
    for t, vals in recorder.cos_exact.items():
        band_cos[band_of(t)].append(torch.cat(vals))
    band_dep = [[] for _ in BANDS]
    for t, vals in recorder.cos_dependence.items():
        band_dep[band_of(t)].append(torch.cat(vals))
    per_step_exact = [float(torch.cat(recorder.cos_exact[t]).nanmean()) if t in recorder.cos_exact else float("nan")
                      for t in timesteps]
    return {
        "method": method, "seeds": [seeds[0], seeds[-1]], "cpu_seconds": cpu,
        "joint": summary["joint_satisfaction"], "joint_on_manifold": good,
        "satisfaction": summary["satisfaction"], "final_energy": finite_energy, "final_energy_nonfinite": nonfinite_energy,
        "on_manifold": summary["on_manifold"], "coverage": summary["coverage"], "tv": summary["tv_to_target"],
        "tv_all": summary["tv_distance"], "tv_floor": summary["tv_floor"], "finite_samples": summary["finite"],
        "fallbacks": events["fallback"], "bounded_steps": events["bounded"],
        "satisfying_prototypes": summary["satisfying_prototypes"],
        "cos_exact_band": [float(torch.cat(b).nanmean()) if b else float("nan") for b in band_cos],
        "cos_dependence_band": [float(torch.cat(b).nanmean()) if b else float("nan") for b in band_dep],
        "cos_exact_step": per_step_exact, "nonfinite_steps": recorder.nonfinite,
        "target_joint": target_joint(world, energies),
        # per step over the samples: the median (what the figure shows; robust to a diverged sample) and the
        # mean over the samples whose energy is finite
        "energy_step": {n: [float(np.median(v)) for v in energy_values[k]] for k, n in enumerate(names)},
        "energy_step_mean": {n: [float(np.mean([x for x in v if math.isfinite(x)] or [math.nan]))
                                 for v in energy_values[k]] for k, n in enumerate(names)},
        "cond_cos_step": {k: (v / np.maximum(cond_cos_n, 1)).tolist() for k, v in cond_cos.items()},
        "timesteps": timesteps,
        "errors": len(result.errors),
    }


def target_joint(world: ShapesModel, energies) -> float:
    """Mass of the exact target p(k | c) on the prototypes that satisfy every condition: the ground
    truth likelihoods are soft (exp(-E(mu_k)/T)), so even exact samples miss the joint sometimes."""
    from zmagic_core.models.shapes.evaluate import SATISFIED_RATIO, condition_log_likelihoods

    ok = (condition_log_likelihoods(world, energies) >= math.log(SATISFIED_RATIO)).all(0)
    return float(torch.softmax(target_log_weights(world, energies), 0)[ok].sum())


def seed_sets(samples: int, sets: int) -> list[list[int]]:
    per = max(1, samples // sets)
    return [list(range(1000 * j, 1000 * j + per)) for j in range(sets)]


def nanmean(values) -> np.ndarray:
    """Mean over the first axis ignoring NaN; NaN (without a warning) where all are NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.array(values, dtype=float), 0)


# -- aggregation ---------------------------------------------------------------------------------
def interval(values) -> tuple[float, float, float]:
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if not len(v):
        return float("nan"), float("nan"), float("nan")
    return float(v.mean()), float(v.min()), float(v.max())


def fmt(values, digits: int = 2, spread: bool = True) -> str:
    m, lo, hi = interval(values)
    if math.isnan(m):
        return "-"
    if not spread or lo == hi:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


# -- sweep ---------------------------------------------------------------------------------------
def sweep(world, samples: int, steps: int, batch_size: int, log) -> tuple[float, list[dict]]:
    """Adaptive scale chosen on the tuning scenarios: the highest mean rate of samples that are both
    jointly satisfying and on the manifold, over the tuning scenarios and SWEEP_METHODS.  (Not the
    TV distance: with the sweep's few samples per run, TV differences between scales are within its
    sampling noise; the TV is recorded beside it.)"""
    rows = []
    seeds = list(range(90_000, 90_000 + samples))
    for scale in SWEEP_SCALES:
        for sc in TUNING:
            for method in SWEEP_METHODS:
                r = run_method(world, sc, method, seeds, scale, steps, batch_size)
                rows.append({"scale": scale, "scenario": sc["name"], "method": method, "joint": r["joint"],
                             "on_manifold": r["on_manifold"], "good": r["joint_on_manifold"], "tv_all": r["tv_all"]})
                log(f"sweep scale {scale} {sc['name']} {method}: TV {r['tv_all']:.3f} joint {r['joint']:.3f} "
                    f"on-manifold {r['on_manifold']:.3f} ({r['cpu_seconds']:.1f} s cpu)")
    score = {s: np.mean([r["good"] for r in rows if r["scale"] == s]) for s in SWEEP_SCALES}
    best = max(SWEEP_SCALES, key=lambda s: (score[s], -s))
    return best, rows


def healthiest_then_lowest_tv(rows: list[dict], key: str, values: list, preference: Callable) -> object:
    """The sweeps' rule: the values with the fewest unhealthy runs, among them those within 0.01 of the lowest
    mean TV distance (sampling noise), and of those the first by ``preference``."""
    stats = {v: (sum(not r["healthy"] for r in rows if r[key] == v),
                 float(np.mean([r["tv_all"] for r in rows if r[key] == v]))) for v in values}
    fewest = min(u for u, _ in stats.values())
    best_tv = min(tv for u, tv in stats.values() if u == fewest)
    return min((v for v in values if stats[v][0] == fewest and stats[v][1] <= best_tv + 0.01), key=preference)


def _healthy(r: dict) -> bool:
    """No fallback fired, every sample finite and on the manifold."""
    return r["fallbacks"] == 0 and r["nonfinite_steps"] == 0 and r["on_manifold"] == 1.0


def stress_scale(scale: float) -> float:
    """The next larger swept scale (a notch above the tuned one), or twice the scale past the list."""
    return next((s for s in SWEEP_SCALES if s > scale), 2 * scale)


def defaults_sweep(world, samples: int, steps: int, batch_size: int, scale: float, log) -> dict:
    """The bound on the Hessian term and what loses its component along the score (``project``), jointly
    (they interact: both act on the conditional term; dependent and CAGrad), then CAGrad's rescaling at the
    chosen pair, on DEFAULTS_TUNING, each at the chosen scale and one notch above it (:func:`stress_scale`):
    a default must also hold when a user turns the step size up, and at the tuned scale alone nothing
    fails, so health could not tell the options apart.

    Rule for each stage: the values with the fewest unhealthy runs over both scales (a healthy run: no
    fallback, every sample finite and on the manifold); among them those within 0.01 of the lowest mean TV
    distance (over both scales) count as tied (that is within the sampling noise), and ties go to the
    derivation's value (bound 1), then to the paper's (no projection; no rescaling)."""
    seeds = list(range(80_000, 80_000 + samples))
    scales = [scale, stress_scale(scale)]
    out: dict = {"term_rows": [], "rescale_rows": [], "scales": scales}

    term_of = {term_label(b, p): (b, p) for b, p in TERM_SWEEP}

    def pick(rows, key, values):
        def distance(v):  # from the derivation's value, then from the paper's
            if key == "term":
                bound, project = term_of[v]
                return (math.inf if bound == "none" else abs(math.log(float(bound) / DERIVED_BOUND)),
                        PROJECT_SWEEP.index(project))
            return (RESCALE_SWEEP.index(v),)
        return healthiest_then_lowest_tv(rows, key, values, distance)

    def record(rows, key, value, sc, method, r, at):
        rows.append({key: value, "scale": at, "scenario": sc["name"], "method": method, "tv_all": r["tv_all"],
                     "joint": r["joint"], "on_manifold": r["on_manifold"], "fallbacks": r["fallbacks"],
                     "nonfinite": r["nonfinite_steps"], "bounded": r["bounded_steps"], "healthy": _healthy(r)})
        log(f"defaults sweep scale {at} {key} {value} {sc['name']} {method}: TV {r['tv_all']:.3f} joint "
            f"{r['joint']:.3f} on-manifold {r['on_manifold']:.3f} fallbacks {r['fallbacks']} bounded "
            f"{r['bounded_steps']} ({r['cpu_seconds']:.1f} s cpu)")

    for at in scales:
        for label, (bound, project) in term_of.items():
            for sc in DEFAULTS_TUNING:
                for method in BOUND_METHODS:
                    if method.startswith("dep") and len(sc["conditions"]) != 2:
                        continue
                    extra = {"rescale": "none"} if method.startswith("cagrad") else {}
                    r = run_method(world, sc, method, seeds, at, steps, batch_size,
                                   lambda m=method, b=bound, p=project, e=extra: make_combiner(m, bound=b, project=p,
                                                                                               **e),
                                   order=method_order(method, len(sc["conditions"])))
                    record(out["term_rows"], "term", label, sc, method, r, at)
    out["bound"], out["project"] = term_of[pick(out["term_rows"], "term", list(term_of))]
    for at in scales:
        for rescale in RESCALE_SWEEP:
            for sc in DEFAULTS_TUNING:
                r = run_method(world, sc, "cagrad c=0.5", seeds, at, steps, batch_size,
                               lambda rs=rescale: make_combiner("cagrad c=0.5", bound=out["bound"], project=out["project"],
                                                                rescale=rs))
                record(out["rescale_rows"], "rescale", rescale, sc, "cagrad c=0.5", r, at)
    out["rescale"] = pick(out["rescale_rows"], "rescale", RESCALE_SWEEP)
    return out


def _setting_runs(world, key: str, values, label: Callable, tuning: list[dict], methods, samples: int, steps: int,
                  batch_size: int, scale: float, log) -> list[dict]:
    """Every (value, scenario, method) run of a row family's sweep at the chosen scale: run_method's keyword
    ``key`` set to each value, the rows labelled ``label(value)``."""
    seeds = list(range(80_000, 80_000 + samples))
    rows = []
    for value in values:
        for sc in tuning:
            for method in methods:
                r = run_method(world, sc, method, seeds, scale, steps, batch_size, **{key: value})
                rows.append({key: label(value), "scenario": sc["name"], "method": method, "tv_all": r["tv_all"],
                             "joint": r["joint"], "on_manifold": r["on_manifold"], "healthy": _healthy(r),
                             "cpu_seconds": r["cpu_seconds"]})
                log(f"{key} sweep {label(value)} {sc['name']} {method}: TV {r['tv_all']:.3f} joint {r['joint']:.3f} "
                    f"on-manifold {r['on_manifold']:.3f} ({r['cpu_seconds']:.1f} s cpu)")
    return rows


def staging_sweep(world, samples: int, steps: int, batch_size: int, scale: float, log) -> dict:
    """When the appearance conditions start (``stage``), on STAGE_TUNING with STAGE_METHODS at the chosen scale.

    Rule: the fewest unhealthy runs, then the lowest mean TV distance; values within 0.01 of it count as tied
    (sampling noise) and ties go to no staging, then to the earliest start (the least change)."""
    rows = _setting_runs(world, "stage", STAGE_SWEEP, stage_label, STAGE_TUNING, STAGE_METHODS, samples, steps,
                         batch_size, scale, log)
    labels = [stage_label(v) for v in STAGE_SWEEP]
    chosen = healthiest_then_lowest_tv(rows, "stage", labels, labels.index)  # ties: none, then the earliest start
    return {"rows": rows, "samples": samples, "scale": scale, "stage": STAGE_SWEEP[labels.index(chosen)]}


def travel_sweep(world, samples: int, steps: int, batch_size: int, scale: float, log) -> dict:
    """How many time-travel repeats per step the `travel` rows take, on TRAVEL_TUNING with TRAVEL_METHODS at the
    chosen scale.  Rule: the fewest unhealthy runs, then the lowest mean TV distance; values within 0.01 of it
    count as tied (sampling noise) and ties go to the fewest repeats (the cheapest)."""
    rows = _setting_runs(world, "travel", TRAVEL_SWEEP, lambda v: v, TRAVEL_TUNING, TRAVEL_METHODS, samples, steps,
                         batch_size, scale, log)
    chosen = healthiest_then_lowest_tv(rows, "travel", list(TRAVEL_SWEEP), lambda v: v)
    return {"rows": rows, "samples": samples, "scale": scale, "travel": chosen}


def stage_label(stage: Optional[int]) -> str:
    """A staged start as the sweep's table shows it."""
    return "none" if stage is None else f"t <= {stage}"


def term_label(bound, project) -> str:
    """A (bound, project) pair of the defaults sweep as its table shows it."""
    return f"{bound} / {project}"


# -- tuned mode ----------------------------------------------------------------------------------
def tune_methods(world, methods: list[tuple[str, Optional[Callable[[], Combiner]]]], samples: int, steps: int,
                 batch_size: int, log) -> dict:
    """Each method's own scale: app/tune.py's grid search over TUNED_GRID on the TUNING scenarios,
    minimising the mean TV distance over them subject to a mean on-manifold rate >= TUNED_ON_MANIFOLD."""
    from zmagic_core.app.tune import GridSearch, ParameterSpec, Trial, search

    seeds = list(range(90_000, 90_000 + samples))  # the sweep's seeds: tuning scenarios only
    out = {}
    for label, factory in methods:
        trials = []

        def evaluate(params, round_, label=label, factory=factory):
            runs = [run_method(world, sc, label, seeds, params["scale"], steps, batch_size, factory) for sc in TUNING]
            tv = float(np.mean([r["tv_all"] for r in runs]))
            on = float(np.mean([r["on_manifold"] for r in runs]))
            trials.append({"scale": params["scale"], "round": round_, "tv_all": tv, "on_manifold": on,
                           "joint_on_manifold": float(np.mean([r["joint_on_manifold"] for r in runs])),
                           "cpu_seconds": sum(r["cpu_seconds"] for r in runs)})
            log(f"tune {label} scale {params['scale']}: mean TV {tv:.3f}, on-manifold {on:.3f}")
            return Trial(params, tv, max(0.0, TUNED_ON_MANIFOLD - on))

        history = search(GridSearch([ParameterSpec(path="scale", **TUNED_GRID)]), evaluate)
        best = min(history, key=Trial.rank)
        out[label] = {"scale": best.params["scale"], "feasible": best.feasible, "trials": trials}
        log(f"tuned {label}: scale {best.params['scale']} ({len(trials)} candidates)")
    return out


def tuned_methods(specs: Optional[list[CombinerSpec]]) -> list[tuple[str, Optional[Callable[[], Combiner]]]]:
    """The methods --tuned tunes: TUNED_METHODS, or each --combiners combiner that takes two conditions."""
    if specs is None:
        return [(m, None) for m in TUNED_METHODS]
    return [(s.label, s.build) for s in specs if s.accepts(2)]


def tuned_section(tuned: Optional[dict], results: dict, scale) -> list[str]:
    """The page's side-by-side table: each tuned method at the equal scale and at its own best scale."""
    if not tuned:
        return []
    lines = ["### Tuned: each combiner at its own best scale", "",
             f"Each method's adaptive scale chosen on its own by `zmagic tune`'s grid strategy (app/tune.py; every "
             f"point of TFG's log grid from {TUNED_GRID['start']} by x{TUNED_GRID['factor']:g} up to "
             f"{TUNED_GRID['maximum']}) on the tuning scenarios above "
             f"({tuned.get('samples', '?')} samples per run, seeds 90000..), minimising the mean TV distance over "
             f"them subject to a mean on-manifold rate >= {TUNED_ON_MANIFOLD}; then the reported scenarios again at "
             f"that scale, same seeds. Equal scale: {scale} for every method.", "",
             "| method | tuned scale | candidates (scale: mean TV, on-manifold) |", "|---|---|---|"]
    for method, t in tuned["methods"].items():
        tried = ", ".join(f"{r['scale']:g}: {r['tv_all']:.3f}, {r['on_manifold']:.2f}"
                          for r in sorted(t["trials"], key=lambda r: r["scale"]))
        lines.append(f"| {method} | **{t['scale']:g}**{'' if t['feasible'] else ' (no scale met the constraint)'} "
                     f"| {tried} |")
    lines += ["", "| scenario | method | TV, equal scale | TV, own scale | joint & on-man., equal | "
              "joint & on-man., own |", "|---|---|---|---|---|---|"]
    verdicts = []
    for sc_name, methods in tuned["results"].items():
        for method, runs in methods.items():
            equal = results.get(sc_name, {}).get(method)
            if equal is None:
                continue
            lines.append(f"| {sc_name} | {method} (own scale {tuned['methods'][method]['scale']:g}) | "
                         f"{fmt([r['tv_all'] for r in equal], 3)} | {fmt([r['tv_all'] for r in runs], 3)} | "
                         f"{fmt([r['joint_on_manifold'] for r in equal])} | {fmt([r['joint_on_manifold'] for r in runs])} |")
        if "sum" in methods and "dep 1>2" in methods and "sum" in results.get(sc_name, {}) \
                and "dep 1>2" in results.get(sc_name, {}):
            tv = lambda runs: interval([r["tv_all"] for r in runs])[0]  # noqa: E731
            verdicts.append((sc_name, tv(results[sc_name]["dep 1>2"]) - tv(results[sc_name]["sum"]),
                             tv(methods["dep 1>2"]) - tv(methods["sum"])))
    lines.append("")
    if verdicts:
        at_equal = sum(e < -5e-4 for _, e, _ in verdicts)  # a tie at the shown precision is no lead
        at_own = sum(o < -5e-4 for _, _, o in verdicts)
        lines += ["TV of `dep 1>2` minus TV of `sum` (negative: dependent better): "
                  + "; ".join(f"{n}: {e:+.3f} at equal scale, {o:+.3f} at own scales" for n, e, o in verdicts) + ".",
                  "",
                  f"**Does dependent's advantage survive fair tuning?** At equal scale `dep 1>2` has the lower TV in "
                  f"{at_equal} of {len(verdicts)} scenarios, at each method's own best scale in {at_own} of "
                  f"{len(verdicts)}. "
                  + _survival(at_equal, at_own, len(verdicts))
                  + " (Differences smaller than the seed-set spread in the table above are within sampling noise.)", ""]
    return lines


def _survival(at_equal: int, at_own: int, n: int) -> str:
    """The sentence on dependent's advantage, from the scenarios it leads at equal and at own scales."""
    if at_equal > n / 2:
        return ("It survives: with each method at its own scale, dependent is still ahead in most scenarios."
                if at_own > n / 2 else "It does not survive: with each method at its own scale, dependent is ahead "
                "in no more than half of the scenarios; its gain at equal scale was step size.")
    return ("At equal scale it had no advantage in most scenarios; with each method at its own scale it is ahead "
            "in most." if at_own > n / 2 else "Neither at equal scale nor at each method's own scale is dependent "
            "ahead in most scenarios.")


# -- figures -------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


EXTRA_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")  # Dark2


def method_colors(results: dict) -> dict[str, str]:
    """The same colour for a method in every figure: the built-in labels keep theirs (C0..C9 in the
    order of ALL_METHODS); other labels (--combiners) take the Dark2 colours in order of appearance."""
    labels = list(dict.fromkeys(m for methods in results.values() for m in methods))
    extras = [m for m in labels if m not in ALL_METHODS]
    return {m: f"C{ALL_METHODS.index(m) % 10}" if m in ALL_METHODS else EXTRA_COLORS[extras.index(m) % len(EXTRA_COLORS)]
            for m in labels}


def _curve(ax, ts, runs, label, style="-", color=None):
    arr = np.array(runs, dtype=float)
    mean = nanmean(arr)
    (line,) = ax.plot(ts, mean, style, label=label, lw=1.2, color=color)
    if len(arr) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanmin(arr, 0), np.nanmax(arr, 0)
        ax.fill_between(ts, lo, hi, color=line.get_color(), alpha=0.18)


def figure_energies(results: dict, out: Path) -> list[str]:
    plt = _plt()
    colors = method_colors(results)
    files = []
    for sc_name, methods in results.items():
        names = list(next(iter(methods.values()))[0]["energy_step"])
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.0), squeeze=False)
        for k, n in enumerate(names):
            ax = axes[0, k]
            for method, runs in methods.items():
                ts = runs[0]["timesteps"]
                _curve(ax, ts, [r["energy_step"][n] for r in runs], method,
                       "--" if method in ("none", "oracle") else "-", colors[method])
            ax.set_xlim(1000, 0)
            ax.set_xlabel("t (energy of the clean estimate after the step)")
            ax.set_ylabel(f"median energy {n}")
            ax.set_yscale("symlog", linthresh=0.01)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{sc_name}: {n}")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(len(labels), 6))
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        fname = f"energies_{slug(sc_name)}.png"
        save_figure(fig, out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


def figure_condition_cosine(results: dict, out: Path) -> Optional[str]:
    plt = _plt()
    pairs = [(n, m) for n, m in results.items() if "dep 1>2" in m and "sum" in m]
    if not pairs:
        return None
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.4), squeeze=False)
    for ax, (sc_name, methods) in zip(axes[0], pairs):
        ts = methods["sum"][0]["timesteps"]
        key = next(k for k in methods["sum"][0]["cond_cos_step"] if "~" in k and "|" not in k)
        _curve(ax, ts, [r["cond_cos_step"][key] for r in methods["sum"]], f"sum: cos(g1, g2)")
        _curve(ax, ts, [r["cond_cos_step"]["g1~g2|1"] for r in methods["dep 1>2"]], "dependent: cos(g1, g2|1)")
        if "dep-noH 1>2" in methods:
            _curve(ax, ts, [r["cond_cos_step"]["g1~g2|1"] for r in methods["dep-noH 1>2"]],
                   "dependent, no Hessian: cos(g1, g2|1)", "--")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlim(1000, 0)
        ax.set_ylim(-1, 1)
        ax.set_xlabel("t")
        ax.set_title(sc_name)
    axes[0, 0].set_ylabel("cosine between the conditions' gradients")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "cosine_conditions.png", dpi=110)
    plt.close(fig)
    return "cosine_conditions.png"


def figure_cosine_exact(results: dict, out: Path) -> str:
    plt = _plt()
    n = len(results)
    cols = min(n + 1, 4)
    rows = -(-(n + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.1 * rows), squeeze=False)
    flat = list(axes.flat)
    colors = method_colors(results)
    seen = {}
    for ax, (sc_name, methods) in zip(flat, results.items()):
        for method, runs in methods.items():
            if method in ("none", "oracle"):
                continue
            _curve(ax, runs[0]["timesteps"], [r["cos_exact_step"] for r in runs], method, "-", colors[method])
            seen[method] = ax.lines[-1]
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlim(1000, 0)
        ax.set_ylim(-0.5, 1)
        ax.set_xlabel("t")
        ax.set_ylabel("cos(G, exact grad log p(c|x_t))", fontsize=7)
        ax.set_title(sc_name, fontsize=9)
    for ax in flat[n:]:
        ax.axis("off")
    flat[-1].legend(list(seen.values()), list(seen), fontsize=8, loc="center")
    fig.tight_layout()
    save_figure(fig, out / "cosine_exact.png", dpi=100)
    plt.close(fig)
    return "cosine_exact.png"


def figure_joint(results: dict, out: Path) -> str:
    plt = _plt()
    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.3 * n), squeeze=False)
    for ax, (sc_name, methods) in zip(axes[:, 0], results.items()):
        labels = list(methods)
        for j, key, color in ((0, "joint", "C0"), (1, "joint_on_manifold", "C1")):
            vals = [interval([r[key] for r in methods[m]]) for m in labels]
            x = np.arange(len(labels)) + (j - 0.5) * 0.38
            mean = np.array([v[0] for v in vals])
            err = np.array([[v[0] - v[1] for v in vals], [v[2] - v[0] for v in vals]])
            ax.bar(x, mean, 0.38, yerr=err, color=color, capsize=2,
                   label="joint satisfaction" if j == 0 else "joint and on-manifold")
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(sc_name, fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, out / "joint_satisfaction.png", dpi=100)
    plt.close(fig)
    return "joint_satisfaction.png"


def make_figures(results: dict, scenarios: list[dict], out: Path) -> dict:
    figures = {"energies": {}}
    for f, sc in zip(figure_energies(results, out), scenarios):
        figures["energies"][slug(sc["name"])] = f
    figures["joint"] = figure_joint(results, out)
    figures["cosine_conditions"] = figure_condition_cosine(results, out)
    figures["cosine_exact"] = figure_cosine_exact(results, out)
    return figures


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


# -- the page ------------------------------------------------------------------------------------
def defaults_section(sweep: Optional[dict]) -> list[str]:
    """The lines of the defaults sweep (the bound on the Hessian term, the projection off the score, CAGrad's
    rescaling), if it ran."""
    from zmagic_core.method.combiners import DEFAULT_BOUND, DEFAULT_PROJECT, CAGradOptions  # to compare

    lines = ["### Bound on the Hessian term, projection off the score and CAGrad's rescaling (chosen on held-out "
             "scenarios)", ""]
    if not sweep:
        return lines + ["Not swept in this run (it runs with the step-size sweep, i.e. without `--scale`).", ""]
    tuning = "; ".join(f"{t['name']} ({' + '.join(f'{k} {o}' for _, k, o in t['conditions'])}"
                       + (", DDIM" if t.get("solver") == "ddim" else "") + ")" for t in DEFAULTS_TUNING)
    default_rescale = CAGradOptions.model_fields["rescale"].default
    lines += [
        f"Held-out scenarios: {tuning}; {sweep.get('samples', '?')} samples per run (seeds 80000..), at the chosen "
        f"step size and one notch above it (scales {sweep.get('scales', '?')}: a default must still hold when the "
        "step size is turned up, and at the tuned scale alone no option fails). First, jointly (both act on the "
        f"conditional term), the bound on the Hessian term (`bound`, over {list(BOUND_SWEEP)}) and what loses its "
        f"component along the score (`project`, over {list(PROJECT_SWEEP)}), with {', '.join(BOUND_METHODS)} (CAGrad "
        f"without rescaling); then CAGrad's rescaling over {list(RESCALE_SWEEP)} at the chosen pair. Rule for each: "
        "the fewest unhealthy runs over both scales (a healthy run: no "
        "fallback, every sample finite and on the manifold), then the lowest mean TV distance over both, values "
        "within 0.01 of it counting as "
        f"tied (sampling noise); ties go to the derivation's value (bound {DERIVED_BOUND}), else to the paper's "
        "(no projection, no rescaling). "
        f"Chosen: bound **{sweep['bound']}**, project **{sweep.get('project', 'not swept')}**, rescale "
        f"**{sweep['rescale']}**; the combiners' defaults are bound {DEFAULT_BOUND}, project {DEFAULT_PROJECT} and "
        f"rescale {default_rescale}"
        + (" (the same)." if (str(sweep['bound']) == str(DEFAULT_BOUND) and sweep['rescale'] == default_rescale
                              and sweep.get('project') == DEFAULT_PROJECT)
           else " (NOT the same: re-check the defaults)."),
        "",
    ]
    for key, values, rows in (("term", [term_label(b, p) for b, p in TERM_SWEEP], sweep["term_rows"]),
                              ("rescale", RESCALE_SWEEP, sweep["rescale_rows"])):
        columns = list(dict.fromkeys((r["scenario"], r["method"]) for r in rows))
        heading = "bound / project" if key == "term" else key
        lines += [f"| {heading} | scale | " + " | ".join(f"{sc} {m}" for sc, m in columns)
                  + " | mean TV | unhealthy runs |", "|---|---|" + "---|" * (len(columns) + 2)]
        for v in values:
            for at in dict.fromkeys(r.get("scale") for r in rows):
                mine = {(r["scenario"], r["method"]): r for r in rows if r[key] == v and r.get("scale") == at}
                cells = []
                for col in columns:
                    r = mine.get(col)
                    if r is None:
                        cells.append("-")
                        continue
                    flags = ((f", fb {r['fallbacks']}" if r["fallbacks"] else "")
                             + (f", bnd {r['bounded']}" if r["bounded"] else ""))
                    cells.append(f"{r['tv_all']:.2f} (m {r['on_manifold']:.2f}{flags})")
                lines.append(f"| {v} | {at} | " + " | ".join(cells)
                             + f" | {np.mean([r['tv_all'] for r in mine.values()]):.3f} | "
                             f"{sum(not r['healthy'] for r in mine.values())} |")
        lines.append("")
    lines += ["Cells: TV distance (m = on-manifold rate, fb = fallback sample-steps, bnd = sample-steps where the "
              "bound was active; under DDIM (eta = 0) the trust region is 0 and every step counts).", ""]
    return lines


def staging_section(sweep: Optional[dict]) -> list[str]:
    """The lines of the staging sweep (when the appearance conditions start); none when no staged row ran."""
    if not sweep:
        return []
    lines = ["### Staged guidance: layout first", ""]
    tuning = "; ".join(f"{t['name']} ({' + '.join(f'{k} {o}' for _, k, o in t['conditions'])})" for t in STAGE_TUNING)
    chosen = sweep.get("stage", "given on the command line")
    lines += [
        "The `staged` rows guide the layout conditions (mask, keypoints: where the shape is, which the sampler "
        "decides at high noise) from the first step and the appearance conditions (attribute, style: FreeDoM's "
        "estimate of which on the blurry clean estimate of high noise also pulls on position) only for t <= the "
        "staged start; every condition is an ordinary per-condition window (`start` in a recipe). "
        + ("The start is given on the command line (`--staged-start`): no sweep." if not sweep.get("rows") else
           f"Held-out scenarios: {tuning}; {sweep.get('samples', '?')} samples per run (seeds 80000..) at scale "
           f"{sweep.get('scale', '?')}, with {', '.join(STAGE_METHODS)}, over {[stage_label(v) for v in STAGE_SWEEP]}. "
           "Rule: the fewest unhealthy runs, then the lowest mean TV distance, values within 0.01 of it tied (sampling "
           "noise), ties to no staging, then to the earliest start."),
        "",
        f"Chosen: **{stage_label(chosen) if not isinstance(chosen, str) else chosen}**.",
        "",
    ]
    if sweep.get("rows"):
        lines += sweep_table(sweep["rows"], "stage", "start", lambda r: f"{r['tv_all']:.2f} (j {r['joint']:.2f})")
        lines += ["", "Cells: TV distance (j = joint satisfaction).", ""]
    return lines


def sweep_table(rows: list[dict], key: str, title: str, cell: Callable[[dict], str]) -> list[str]:
    """A sweep's table: one line per value of ``key``, one column per (scenario, method), then the mean TV
    and the number of unhealthy runs."""
    columns = list(dict.fromkeys((r["scenario"], r["method"]) for r in rows))
    lines = [f"| {title} | " + " | ".join(f"{sc} {m}" for sc, m in columns) + " | mean TV | unhealthy runs |",
             "|---|" + "---|" * (len(columns) + 2)]
    for v in dict.fromkeys(r[key] for r in rows):
        mine = {(r["scenario"], r["method"]): r for r in rows if r[key] == v}
        cells = [cell(mine[c]) if c in mine else "-" for c in columns]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {np.mean([r['tv_all'] for r in mine.values()]):.3f} | "
                     f"{sum(not r['healthy'] for r in mine.values())} |")
    return lines


def travel_section(sweep: Optional[dict]) -> list[str]:
    """The lines of the time-travel sweep (how many repeats per step); none when no travel row ran."""
    if not sweep:
        return []
    tuning = "; ".join(f"{t['name']} ({' + '.join(f'{k} {o}' for _, k, o in t['conditions'])})" for t in TRAVEL_TUNING)
    lines = ["### Time travel: repeats per step", "",
             "The `travel` rows repeat every guided step (FreeDoM's time travel, each condition's `time_travel` in a "
             "recipe): after the step to t', x_t' is taken back to level t by the forward process (fresh noise) and the "
             "step is taken again, so the guidance acts several times per level while the noise undoes what it gets "
             "wrong; each repeat costs one more step's work. "
             + ("The count is given on the command line (`--travel`): no sweep." if not sweep.get("rows") else
                f"Held-out scenarios: {tuning}; {sweep.get('samples', '?')} samples per run (seeds 80000..) at scale "
                f"{sweep.get('scale', '?')}, with {', '.join(TRAVEL_METHODS)}, over {list(TRAVEL_SWEEP)} repeats. Rule: "
                "the fewest unhealthy runs, then the lowest mean TV distance, values within 0.01 of it tied (sampling "
                "noise), ties to the fewest repeats."),
             "", f"Chosen: **{sweep.get('travel')} repeat(s) per step**.", ""]
    if sweep.get("rows"):
        lines += sweep_table(sweep["rows"], "travel", "repeats",
                             lambda r: f"{r['tv_all']:.2f} (j {r['joint']:.2f}, m {r['on_manifold']:.2f})")
        lines += ["", "Cells: TV distance (j = joint satisfaction, m = on-manifold rate).", ""]
    return lines


FLOW_NOTE = (" as a flow-matching model (`--model shapes-flow`: exact velocity, x_s = (1 - s) x0 + s eps, "
             "sampled in VP coordinates; docs/method.md, Flow matching)")


def page_section(args, meta: dict, scale, sweep_rows, results, scenarios, figures) -> str:
    """The page's ``quality`` section; ``meta``: the run's record in quality.json (argv, machine, date,
    wall, version, and with --combiners the labels, their descriptions and the scenarios skipped)."""
    wall = meta.get("wall", float("nan"))
    lines = [
        "## Quality: every combiner against the exact oracle (shapes world)",
        "",
        f"Command: `{command('quality', meta.get('argv', []))}`  ",
        f"Machine: {meta.get('machine') or 'not recorded'}  ",
        f"Code: {code(meta)}  ",
        f"Date: {meta.get('date') or 'not recorded'}; wall time {'not recorded' if math.isnan(wall) else f'{wall / 60:.1f} min'} (CPU shared with other jobs: compare CPU seconds within this run only).",
        "",
        f"Setting: shapes world{FLOW_NOTE if meta.get('model') == 'shapes-flow' else ''} (32 px, K = 108 prototypes, "
        f"sigma0 = 0.1), {args.steps} ancestral (DDPM) steps unless the "
        f"scenario says DDIM; {args.seeds_sets} seed sets of {len(seed_sets(args.samples, args.seeds_sets)[0])} samples "
        f"each (seeds 0.., 1000.., 2000.., ...; the same seeds for every method), so {args.samples // args.seeds_sets * args.seeds_sets} "
        "samples per method and scenario. Figures in tables: mean over the seed sets [min, max over the seed sets]. "
        "Every condition is active at every step (no window, no time travel), except in the `staged` and `travel` "
        "rows.",
        "",
    ]
    if meta.get("combiners"):
        lines += [
            "Methods given on the command line (`--combiners`), built through the plugin registry: every scenario "
            "runs no guidance, each named combiner that accepts its number of conditions, and the oracle."
            + (f" The sweep uses {meta.get('sweep_samples', 32)} samples per run and one seed set." if sweep_rows else ""),
            "",
        ]
    else:
        lines += [
            "Reduced to fit a 2-core CPU: CAGrad with c = 0.8 and CAGrad's exact modes run only on the first "
            "scenario (the exact ones also on the 3-condition set); the DDIM scenario runs one order of the dependent "
            "combiner and one CAGrad; the 3- and 4-condition sets run sum and CAGrad with c = 0 and 0.5 (6 and 12 pair "
            "gradients per step), and the `travel` rows of sum and CAGrad c = 0; the dependent combiner takes exactly "
            "two conditions, so it is absent there; `staged` rows run where layout and appearance conditions meet. "
            "Every combiner runs at its defaults unless its label says otherwise (`autograd`: the "
            "exact product; `paper`: the paper's exact update, no bound)."
            + (f" The sweep uses {meta.get('sweep_samples', 32)} samples per run and one seed set." if sweep_rows else ""),
            "",
        ]
    lines += [
        "Metrics (zmagic_core.models.shapes.evaluate): **TV** (the headline) = total variation distance between the "
        "histogram of the prototypes the samples land on (nearest prototype of every sample, all K prototypes; a "
        "non-finite sample lands nowhere) and the exact conditional p(k | c_1..c_n) over all K (`tv_distance`); 0 is "
        "an exact sampler with infinitely many samples, and with finitely many even the exact sampler is above 0: "
        "the oracle's own TV is the floor (its sampling noise; each scenario also gives the expected TV of an exact "
        "sampler with that many samples). *joint* = rate of samples whose nearest prototype satisfies every "
        "condition (p(c_i|k) >= half the best); *joint & on-manifold* = the same and within 2 sigma0 RMS of that prototype; "
        "*E(c)* = mean final energy of the condition on x0 (over the samples where it is finite; the others are counted); "
        "*on-man.* = on-manifold rate; *coverage* = share of the "
        "satisfying prototypes hit; *TV sat.* = total variation between the satisfying samples' prototype histogram and "
        "the exact conditional restricted to the satisfying prototypes; *cos exact* = cosine between the method's "
        "combined guidance G and the exact grad log p(c_1..c_n | x_t) = s_cond(x_t) - s(x_t), per band of t, averaged "
        "over samples and steps in the band; *fallback* = sample-steps where G was not finite and the pipeline's "
        "last line of defence replaced it (sum of the finite g_i); *bounded* = sample-steps where the bound on the "
        "Hessian term was active; *dependence* = cosine between the exact joint gradient and the sum of "
        "the exact single-condition gradients along that method's trajectory (1 = the sum rule is exact there).",
        "",
        "### Step size (chosen on held-out scenarios)",
        "",
    ]
    if sweep_rows:
        lines += [
            "FreeDoM's adaptive rule rho = scale * rms(eps) / rms(grad E), one scale for every condition and every "
            f"method. Swept over {list(SWEEP_SCALES)} with {', '.join(SWEEP_METHODS)} on tuning scenarios that are "
            "not reported below: " + "; ".join(
                f"{t['name']} ({' + '.join(f'{k} {o}' for _, k, o in t['conditions'])})" for t in TUNING)
            + f". Rule: the scale with the highest mean 'joint & on-manifold' rate over those runs (the TV of so "
            f"few samples per run is dominated by its sampling noise; it is shown beside). Chosen: **{scale}**.",
            "",
            "| scale | " + " | ".join(f"{t['name']} {m}" for t in TUNING for m in SWEEP_METHODS) + " | mean |",
            "|---|" + "---|" * (len(TUNING) * len(SWEEP_METHODS) + 1),
        ]
        for s in SWEEP_SCALES:
            row = [r for r in sweep_rows if r["scale"] == s]
            cells = [f"{r['good']:.2f} (j {r['joint']:.2f}, m {r['on_manifold']:.2f}"
                     + (f", TV {r['tv_all']:.2f})" if "tv_all" in r else ")") for r in row]
            lines.append(f"| {s} | " + " | ".join(cells) + f" | {np.mean([r['good'] for r in row]):.3f} |")
        lines += ["", "Cells: joint & on-manifold rate (j = joint satisfaction, m = on-manifold rate, TV = TV distance).", ""]
    else:
        lines += [f"Given on the command line: adaptive rule, scale {scale} for every condition and method (no sweep).", ""]
    lines += defaults_section(meta.get("defaults_sweep"))
    lines += staging_section(meta.get("staging_sweep"))
    lines += travel_section(meta.get("travel_sweep"))
    ran = list(dict.fromkeys(m for methods in results.values() for m in methods))
    helps = {**METHOD_HELP, **meta.get("method_help", {})}
    lines += ["### Methods", ""] + [f"- `{m}`: {helps.get(m, 'not described')}" for m in ran] + [""]
    lines += ["### Scenarios and results", ""]
    for sc in scenarios:
        methods = results[sc["name"]]
        names = [n for n, _, _ in sc["conditions"]]
        first = next(iter(methods.values()))[0]
        lines += [
            f"#### {sc['name']}",
            "",
            "Conditions (in order c1, c2, ...): " + "; ".join(f"`{n}` = {k} {o}" for n, k, o in sc["conditions"])
            + f". Solver: {'DDIM eta=0' if sc.get('solver') == 'ddim' else 'DDPM ancestral'}. "
            f"Satisfying prototypes: {first['satisfying_prototypes']}; mass of the exact target on them "
            f"(the best joint satisfaction an exact sampler reaches; the ground truth p(c|k) is soft): "
            f"{first['target_joint']:.3f}. Why: {sc['why']}."
            + "".join(f" Not run here: `{m}` ({why})." for m, why in meta.get("skipped", {}).get(sc["name"], {}).items()),
            "",
        ]
        if "oracle" in methods and methods["oracle"][0].get("tv_all") is not None:
            runs = methods["oracle"]
            lines += [f"**TV floor**: the oracle's TV {fmt([r['tv_all'] for r in runs], 3)}; the expected TV of an exact "
                      f"sampler with {len(seed_sets(args.samples, args.seeds_sets)[0])} samples (one seed set) is "
                      f"{np.mean([r['tv_floor'] for r in runs]):.3f}.", ""]
        lines += [
            "| method | **TV** | joint | joint & on-man. | " + " | ".join(f"E({n})" for n in names)
            + " | on-man. | coverage | TV sat. | " + " | ".join(f"cos exact t{b}" for b in BAND_NAMES)
            + " | fallback (non-finite G) | bounded | CPU s |",
            "|---|" + "---|" * (9 + len(names) + len(BANDS)),
        ]
        for method, runs in methods.items():
            cells = [fmt([r.get("tv_all") for r in runs], 3),
                     fmt([r["joint"] for r in runs]), fmt([r["joint_on_manifold"] for r in runs])]
            for n in names:
                bad = sum(r.get("final_energy_nonfinite", {}).get(n, 0) for r in runs)
                cells.append(fmt([r["final_energy"][n] for r in runs], 3, False) + (f" ({bad} non-finite)" if bad else ""))
            cells += [fmt([r["on_manifold"] for r in runs], 2, False), fmt([r["coverage"] for r in runs], 2, False),
                      fmt([r["tv"] for r in runs], 2, False)]
            if method in ("none", "oracle"):
                cells += ["-"] * len(BANDS)
            else:
                cells += [fmt([r["cos_exact_band"][b] for r in runs], 2, False) for b in range(len(BANDS))]
            cells.append(str(sum(r.get("nonfinite_steps", 0) for r in runs)))
            cells.append(str(sum(r["bounded_steps"] for r in runs)) if "bounded_steps" in runs[0] else "-")
            cells.append(f"{sum(r['cpu_seconds'] for r in runs):.1f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        if "sum" in methods:
            dep = [fmt([r["cos_dependence_band"][b] for r in methods["sum"]], 2, False) for b in range(len(BANDS))]
            lines += ["", "Dependence along the sum trajectories (cos between exact joint and sum of exact single "
                      "gradients) per band " + ", ".join(f"t{b}: {d}" for b, d in zip(BAND_NAMES, dep)) + "."]
        lines += ["", f"![energies over the steps, {sc['name']}]({DATA_NAME}/{figures['energies'][slug(sc['name'])]})", "",
                  "Paper Figure 3: each condition's energy on the base model's clean estimate after every step, "
                  "median over the samples of a seed set (a few diverged samples dominate the mean; quality.json "
                  "has both), line: mean of the seed sets' medians, band: their min..max.", ""]
    lines += ["### Figures", ""]
    lines += [f"![joint satisfaction per method]({DATA_NAME}/{figures['joint']})", "",
              "Joint satisfaction (blue) and joint & on-manifold rate (orange) per method; bars: mean over the seed "
              "sets, whiskers: min..max over the seed sets.", ""]
    if figures.get("cosine_conditions"):
        lines += [f"![cosine between the conditions' gradients]({DATA_NAME}/{figures['cosine_conditions']})", "",
                  "Paper Figure 1: cosine between g1 and g2 at x_t under sum, and between g1 and g2|1 under the "
                  "dependent combiner, over the steps (band: min..max of the per-seed-set means).", ""]
    lines += [f"![cosine to the exact gradient]({DATA_NAME}/{figures['cosine_exact']})", "",
              "Cosine between each method's G and the exact grad log p(c|x_t) over the steps.", ""]
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="zmagic bench quality", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=positive_int, default=None, help="samples per method and scenario (default 256; --quick 32)")
    p.add_argument("--seeds-sets", type=positive_int, default=None, help="disjoint seed sets the samples are split into (default 4; --quick 2)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default 100; --quick 50)")
    p.add_argument("--quick", action="store_true",
                   help="32 samples in 2 seed sets, 50 steps, 16 samples per scale/defaults sweep run (~30 min on 2 CPU "
                        "cores, most of it the held-out sweeps, which --scale, --staged-start and --travel skip)")
    p.add_argument("--scale", type=positive_float, default=None, help="adaptive scale for every condition (skips the sweep)")
    p.add_argument("--sweep-samples", type=positive_int, default=None, help="samples per sweep run (default 32; --quick 16)")
    p.add_argument("--defaults-sweep", action="store_true",
                   help="run the sweep of the bound on the Hessian term and of CAGrad's rescaling even with --scale "
                        "(without --scale it always runs)")
    p.add_argument("--defaults-samples", type=positive_int, default=None,
                   help="samples per run of that sweep (default 48; --quick 16)")
    p.add_argument("--staged-start", type=non_negative_int, default=None, metavar="T",
                   help="the appearance conditions of the `staged` rows guide for t <= T (default: chosen by a sweep "
                        "on held-out scenarios)")
    p.add_argument("--staging-samples", type=positive_int, default=64, help="samples per run of the staging sweep (default 64)")
    p.add_argument("--travel", type=non_negative_int, default=None, metavar="K",
                   help="time-travel repeats per step of the `travel` rows (default: chosen by a sweep on held-out "
                        "scenarios)")
    p.add_argument("--travel-samples", type=positive_int, default=64,
                   help="samples per run of the time-travel sweep (default 64)")
    p.add_argument("--scenarios", nargs="*", default=None, help="names of the scenarios to run (default all)")
    p.add_argument("--methods", nargs="*", default=None, help="restrict the methods (default: each scenario's list)")
    p.add_argument("--combiners", default=None, metavar="NAME[:K=V...],...",
                   help="registry combiners to run instead of the built-in method lists, comma separated, "
                        "e.g. sum,cagrad:c=0.8,my-combiner (each scenario also runs none and oracle)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    add_out_argument(p)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (1: CPU seconds comparable)")
    p.add_argument("--model", choices=("shapes", "shapes-flow"), default="shapes",
                   help="the shapes world as a VP diffusion (default) or as a flow-matching model (exact velocity)")
    p.add_argument("--tuned", action="store_true",
                   help="also tune each combiner's own scale on the tuning scenarios (every point of the log grid, TV "
                        "distance, on-manifold >= 0.95) and run the reported scenarios at it: equal and own scale side by side")
    p.add_argument("--tuned-samples", type=positive_int, default=None,
                   help="samples per tuning run of --tuned (default 64; --quick 32): the objective is noisy below that")
    p.add_argument("--replot", action="store_true",
                   help="no sampling: redraw the figures and the page section from OUT/benchmarks/quality.json")
    args = p.parse_args(argv)
    # None: not given (the types refuse 0 and below, so `or` replaces nothing that was given)
    args.samples = args.samples or (32 if args.quick else 256)
    args.seeds_sets = args.seeds_sets or (2 if args.quick else 4)
    args.steps = args.steps or (50 if args.quick else 100)
    args.sweep_samples = args.sweep_samples or (16 if args.quick else 32)
    args.defaults_samples = args.defaults_samples or (16 if args.quick else 48)
    args.tuned_samples = args.tuned_samples or (32 if args.quick else 64)
    if args.samples < args.seeds_sets:  # each seed set needs a sample: seed_sets() would draw more than asked
        p.error(f"--samples ({args.samples}) must be at least --seeds-sets ({args.seeds_sets})")
    return args


def select_scenarios(names: Optional[list[str]]) -> list[dict]:
    scenarios = [s for s in SCENARIOS if names is None or s["name"] in names]
    unknown = [n for n in names or [] if n not in {s["name"] for s in SCENARIOS}]
    if unknown or not scenarios:
        raise ConfigError(f"unknown scenario(s) {unknown or names}; known: {[s['name'] for s in SCENARIOS]}")
    return scenarios


def plan(scenario: dict, specs: Optional[list[CombinerSpec]], only: Optional[list[str]]):
    """The methods run on a scenario: [(label, combiner factory or None for the built-in labels)],
    and {label: why} of the named combiners that do not accept its number of conditions."""
    n = len(scenario["conditions"])
    skipped: dict[str, str] = {}
    if specs is None:
        labels = scenario.get("methods", TWO_CONDITION_METHODS if n == 2 else ["none", "sum", "oracle"])
        methods: list[tuple[str, Optional[Callable[[], Combiner]]]] = [(m, None) for m in labels]
    else:
        methods = [("none", None)] + [(s.label, s.build) for s in specs if s.accepts(n)] + [("oracle", None)]
        skipped = {s.label: f"takes {s.arity()} conditions" for s in specs if not s.accepts(n)}
    if only:
        methods = [(m, f) for m, f in methods if m in only]
    return methods, skipped


def replot(args, argv: list[str], page: Path, data: Path, log) -> int:
    path = data / "quality.json"
    if not path.exists():
        raise InputError(f"nothing to re-plot: {path} does not exist (run `zmagic bench quality --out {args.out}` first)")
    results_file = json.loads(path.read_text())
    meta = results_file.get("meta", {})
    if not meta.get("date"):
        import datetime

        mtime = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
        meta["date"] = f"results written {mtime.strftime('%Y-%m-%d %H:%M UTC')}"
    results = results_file["results"]
    scenarios = [s for s in SCENARIOS if s["name"] in results]
    results = {s["name"]: results[s["name"]] for s in scenarios}
    for key in ("samples", "seeds_sets", "steps"):
        setattr(args, key, meta.get(key, getattr(args, key)))
    figures = make_figures(results, scenarios, data)
    text = page_section(args, meta, results_file["scale"], results_file["sweep"], results, scenarios, figures)
    text += "\n".join([""] + tuned_section(results_file.get("tuned"), results, results_file["scale"]))
    text = text.replace("\n\nSetting:", f"\n\nFigures and this section re-drawn on {now()} from quality.json by "
                        f"`{command('quality', argv)}` (no new sampling).\n\nSetting:", 1)
    write_section(page, "quality", text)
    log(f"re-plotted from {path}; wrote {page}")
    return 0


def main(argv: list[str]) -> int:
    argv = [a for a in argv if a != "--"]  # `zmagic bench X -- ARGS`: the separator may be passed through
    args = parse(argv)
    torch.set_num_threads(args.threads)
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:7.1f} s] {msg}", flush=True)

    if args.replot:
        return replot(args, argv, *layout(args.out), log)
    # everything the command line names is checked before any sampling (and before OUT is created)
    specs = parse_combiners(args.combiners) if args.combiners else None
    scenarios = select_scenarios(args.scenarios)
    plans = {sc["name"]: plan(sc, specs, args.methods) for sc in scenarios}
    page, data = layout(args.out)
    meta = {"argv": list(argv), "model": args.model, "samples": args.samples, "seeds_sets": args.seeds_sets, "steps": args.steps,
            "sweep_samples": args.sweep_samples, "date": now(), "machine": machine(), "version": version()}
    if specs is not None:
        meta["combiners"] = [s.label for s in specs]
        meta["method_help"] = {s.label: s.description for s in specs}
        meta["skipped"] = {name: skipped for name, (_, skipped) in plans.items() if skipped}
    world = ShapesFlowModel(32) if args.model == "shapes-flow" else ShapesModel(32)
    if args.scale is None:
        scale, sweep_rows = sweep(world, args.sweep_samples, args.steps, args.batch_size, log)
        log(f"chosen scale {scale}")
    else:
        scale, sweep_rows = args.scale, []
    if args.scale is None or args.defaults_sweep:
        defaults = defaults_sweep(world, args.defaults_samples, args.steps, args.batch_size, scale, log)
        meta["defaults_sweep"] = {"samples": args.defaults_samples, **defaults}
        log(f"defaults sweep: bound {defaults['bound']}, project {defaults['project']}, rescale {defaults['rescale']}")

    def row_option(suffix, given, flag, meta_key, key, sweep, describe):
        """A row family's setting (staged start, time-travel repeats): given, or chosen by its sweep when a
        scenario runs such rows; recorded in meta[meta_key]."""
        if not any(suffix in split_label(m)[1] for methods, _ in plans.values() for m, _ in methods):
            if given is not None:
                log(f"{flag} {given} has no effect: no{suffix} row runs on the chosen scenarios and methods")
            return given
        meta[meta_key] = {key: given} if given is not None else sweep()
        if given is None:
            log(f"{meta_key.replace('_', ' ')}: {describe(meta[meta_key][key])}")
        return meta[meta_key][key]

    stage = row_option(STAGED, args.staged_start, "--staged-start", "staging_sweep", "stage", lambda: staging_sweep(
        world, args.staging_samples, args.steps, args.batch_size, scale, log), stage_label)
    travel = row_option(TRAVEL, args.travel, "--travel", "travel_sweep", "travel", lambda: travel_sweep(
        world, args.travel_samples, args.steps, args.batch_size, scale, log), lambda v: f"{v} repeat(s) per step")
    sets = seed_sets(args.samples, args.seeds_sets)
    results: dict[str, dict[str, list[dict]]] = {}
    tuned: dict = {}
    if args.tuned:
        to_tune = tuned_methods(specs)
        tuned = {"samples": args.tuned_samples, "results": {},
                 "methods": tune_methods(world, to_tune, args.tuned_samples, args.steps, args.batch_size, log)}
    for sc in scenarios:
        methods, skipped = plans[sc["name"]]
        for label, why in skipped.items():
            log(f"{sc['name']:>24} {label:>13}: skipped ({why})")
        results[sc["name"]] = {}
        for method, factory in methods:
            runs = []
            suffixes = split_label(method)[1]
            staged = stage if STAGED in suffixes else None
            repeats = travel if TRAVEL in suffixes else 0
            for seeds in sets:
                runs.append(run_method(world, sc, method, seeds, scale, args.steps, args.batch_size, factory,
                                       stage=staged, travel=repeats))
            results[sc["name"]][method] = runs
            if args.tuned and method in tuned["methods"]:  # the same method again at its own tuned scale
                own = tuned["methods"][method]["scale"]
                tuned["results"].setdefault(sc["name"], {})[method] = runs if own == scale else [
                    run_method(world, sc, method, seeds, own, args.steps, args.batch_size, factory) for seeds in sets]
                log(f"{sc['name']:>24} {method:>13}: at own scale {own}: TV "
                    f"{fmt([r['tv_all'] for r in tuned['results'][sc['name']][method]], 3)}")
            log(f"{sc['name']:>24} {method:>13}: joint {fmt([r['joint'] for r in runs])}, "
                f"on-manifold {fmt([r['on_manifold'] for r in runs], 2, False)}, "
                f"cos exact {[round(float(x), 2) for x in nanmean([r['cos_exact_band'] for r in runs])]}, "
                f"{sum(r['cpu_seconds'] for r in runs):.1f} s cpu")
        meta["wall"] = time.time() - started
        tuned_file = {"tuned": tuned} if args.tuned else {}
        write_text(data / "quality.json", json.dumps({"scale": scale, "sweep": sweep_rows, "results": results,
                                                      **tuned_file, "meta": meta}))
    results = {name: methods for name, methods in results.items() if methods}
    scenarios = [sc for sc in scenarios if sc["name"] in results]
    if not results:
        raise ConfigError("no method ran on the chosen scenarios (see --methods and --combiners)")
    figures = make_figures(results, scenarios, data)
    meta["wall"] = time.time() - started
    saved = data / "quality.json"
    if saved.exists():  # the page and the results file carry the same wall time (--replot redraws the page from it)
        final = json.loads(saved.read_text())
        final["meta"]["wall"] = meta["wall"]
        write_text(saved, json.dumps(final))
    text = page_section(args, meta, scale, sweep_rows, results, scenarios, figures)
    text += "\n".join([""] + tuned_section(tuned if args.tuned else None, results, scale))
    write_section(page, "quality", text)
    log(f"wrote {page} and figures in {data}")
    return 0
