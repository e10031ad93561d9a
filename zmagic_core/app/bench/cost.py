"""`zmagic bench cost`: network passes, seconds and peak memory per guided step, per combiner.

    zmagic bench cost --out docs                   # every model, every case (docs/benchmarks.md)
    zmagic bench cost --models shapes --steps 3 --out /tmp/c
    zmagic bench cost --models shapes --combiners sum,cagrad:c=0.8,my-combiner --out /tmp/c
    zmagic bench cost --cvxpy-only --out docs      # only CAGrad's cvxpy solve (its own section)
    zmagic bench cost --replot --out docs          # no measurement: the sections from cost.json, cvxpy.json

The report goes to ``--out DIR`` (default ./zmagic-bench): the sections ``cost`` and ``cvxpy`` of
DIR/benchmarks.md, and cost.json and cvxpy.json in DIR/benchmarks/.

Cases: sum, dependent, dependent without the Hessian term and cagrad (c = 0.5), for n = 2, 3, 4
conditions (dependent: n = 2 only), on three base models: the shapes world (its closed-form
eps is the "network"), a tiny diffusers UNet2DModel (the tiny pixel UNet of diffusers' own
tests) and a random-initialised UNet with the real CelebA-HQ 256 DDPM architecture at a reduced
size.  ``--combiners`` replaces the four combiners by registry names (installed plugins
included; ``name:key=value`` sets options), each run for the n it accepts; sum always runs, as
the reference of the ratios.

How passes are counted: the model's eps is wrapped so that every call is one forward pass; its
input and output go through identity ``torch.autograd.Function``s whose backward methods count
(output side) one backward pass through the network each time autograd traverses its graph, and
(input side) return the gradient through a third identity whose backward counts one *double*
backward pass each time a second-order gradient traverses the network's backward graph (the
Hessian term).  The identities have vmap rules, so a batched vector-Jacobian product (several
cotangents in one ``is_grads_batched`` call) counts as one pass, as it costs about one.

Every case runs in its own subprocess: seconds per step are process CPU seconds (one torch
thread) over the timed steps after a warm-up step, and peak memory is the growth of the peak
resident set (``ru_maxrss``) of that process across the run, above the process after the model
and energies were built.  Ratios are to ``sum`` with the same n, model and run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Optional

from zmagic_core.app.bench.report import (add_out_argument, code, command, layout, machine, now, parse_combiners,
                                          positive_int, version, write_section)
from zmagic_core.contracts.errors import InputError
from zmagic_core.files.atomic import write_text

COMBINERS = ("sum", "dependent", "dependent-noH", "dependent-autograd", "dependent-paper", "cagrad", "cagrad-paper")
CASE_HELP = {
    "sum": "G = sum_i g_i",
    "dependent": "Algorithm 1 at its defaults: J_Phi g_tilde by a forward difference (no double backward), "
                 "Hessian term bounded, g2 at x_t not computed (no trace cosine)",
    "dependent-noH": "the same without the Hessian term (the difference point needs a forward pass only)",
    "dependent-autograd": "exact vector-Jacobian product (double backward) with the same bound: the product "
                          "split in two so the bound can act on the Hessian term (one more backward)",
    "dependent-paper": "the paper's exact update: one VJP through the step map (double backward), no bound",
    "cagrad": "Algorithm 2 at its defaults (c = 0.5): forward-difference products, x_hat_i of every first "
              "condition in one stacked network call, every pair's difference point in another",
    "cagrad-paper": "Algorithm 2 as in the paper (c = 0.5): exact VJPs (one batched VJP per first condition), "
                    "no bound, no rescaling",
}
MODELS = ("shapes", "tiny-unet", "celebahq-unet")
SOLVERS = ("ddpm", "ddim")
SCHEDULE_STEPS = {"ddpm": 100, "ddim": 50}  # the usual step counts of each
SOLVER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM (eta = 0)"}
CELEBAHQ_UNET = dict(  # google/ddpm-ema-celebahq-256 unet config, random weights
    in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
)
TINY_UNET = dict(  # the tiny pixel UNet config of diffusers' own tests
    in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)
# the conditions, in order; n conditions = the first n
CONDITIONS = [("red", "attribute", {"attribute": "color", "value": "red"}),
              ("mask", "mask", {"reference": "red circle center"}),
              ("style", "style", {"reference": "red circle center"}),
              ("kp", "keypoints", {"reference": "red circle center"})]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# -- counting --------------------------------------------------------------------------------------
class Counts:
    def __init__(self):
        self.forward = self.backward = self.double = 0

    def as_dict(self):
        return {"forward": self.forward, "backward": self.backward, "double": self.double}


COUNTS = Counts()


def _functions():
    import torch

    class DoubleMark(torch.autograd.Function):
        """Identity on the gradient a backward pass leaves at the network input; its own backward
        runs when a second-order gradient traverses the network's backward graph."""

        generate_vmap_rule = True

        @staticmethod
        def forward(g):
            return g.view_as(g)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, gg):
            COUNTS.double += 1
            return gg

    class InMark(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x.view_as(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return DoubleMark.apply(g)

    class OutMark(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(y):
            return y.view_as(y)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            COUNTS.backward += 1
            return g

    return InMark, OutMark


def counting_model(inner):
    """The same DiffusionModel, with every eps call and every traversal of it counted."""
    from zmagic_core.contracts.components import DiffusionModel

    InMark, OutMark = _functions()

    class Counting(DiffusionModel):
        def __init__(self):
            super().__init__()
            self.inner = inner
            self.register_buffer("alphas_cumprod", inner.alphas_cumprod)
            self.sample_shape = inner.sample_shape

        def eps(self, x_t, t):
            COUNTS.forward += 1
            return OutMark.apply(self.inner.eps(InMark.apply(x_t), t))

        def decode(self, x0):
            return self.inner.decode(x0)

    return Counting()


# -- one case (in a subprocess) --------------------------------------------------------------------
def build_model(name: str, size: int):
    import torch

    from zmagic_core.method.schedule import linear_alphas_cumprod
    from zmagic_core.models.shapes import ShapesModel

    if name == "shapes":
        return ShapesModel(size), "closed-form mixture score, 108 prototypes"
    from diffusers import UNet2DModel

    from zmagic_core.models.pretrained.pixel import DiffusersPixelModel

    torch.manual_seed(0)
    config = dict(TINY_UNET if name == "tiny-unet" else CELEBAHQ_UNET, sample_size=size)
    unet = UNet2DModel(**config)
    params = sum(p.numel() for p in unet.parameters())
    count = f"{params / 1e6:.1f} M" if params >= 1e6 else f"{params / 1e3:.1f} k"
    return DiffusersPixelModel(unet, linear_alphas_cumprod()), f"UNet2DModel, {count} parameters, random weights"


def make_combiner(name: str):
    """The built-in cases by their labels; any other label is a registry combiner (``name[:key=value...]``)."""
    from zmagic_core.method.combiners import CAGradCombiner, DependentCombiner, SumCombiner

    builtin = {"sum": lambda: SumCombiner(), "dependent": lambda: DependentCombiner(),
               "dependent-noH": lambda: DependentCombiner(hessian=False),
               "dependent-autograd": lambda: DependentCombiner(product="autograd"),
               "dependent-paper": lambda: DependentCombiner(product="autograd", bound="none", project="none"),
               "cagrad": lambda: CAGradCombiner(c=0.5),
               "cagrad-paper": lambda: CAGradCombiner(c=0.5, product="autograd", bound="none", project="none", rescale="none")}
    if name in builtin:
        return builtin[name]()
    (spec,) = parse_combiners(name)
    return spec.build()


def run_case(model_name: str, combiner: str, n: int, size: int, batch: int, steps: int, threads: int,
             solver: str = "ddpm") -> dict:
    import torch

    from zmagic_core.method.guidance import Condition
    from zmagic_core.sampling.pipeline import Pipeline
    from zmagic_core.models.shapes import ShapesModel
    from zmagic_core.method.solvers import DDIMSolver, DDPMSolver
    from zmagic_core.app.bench.quality import build_energy

    torch.set_num_threads(threads)
    base, description = build_model(model_name, size)
    world = base if isinstance(base, ShapesModel) else ShapesModel(size)
    conditions = [Condition(name, build_energy(world, kind, opts), "adaptive", 0.25)
                  for name, kind, opts in CONDITIONS[:n]]
    import cvxpy  # noqa: F401  (imported before the memory baseline, for every combiner alike)

    model = counting_model(base)
    step_map = DDIMSolver(0.0) if solver == "ddim" else DDPMSolver()
    pipe = Pipeline(model, step_map, make_combiner(combiner), conditions, steps=SCHEDULE_STEPS[solver])
    pipe.schedule.timesteps = pipe.schedule.timesteps[:steps + 1]  # a warm-up step, then `steps` timed ones
    rss_before = rss_mb()
    marks: list[tuple[float, dict]] = []

    def callback(_):
        marks.append((time.process_time(), COUNTS.as_dict()))

    start = (time.process_time(), COUNTS.as_dict())
    pipe.run(list(range(batch)), batch_size=batch, progress=False, callback=callback)
    first = marks[0]
    timed = marks[1:] or marks
    t0, c0 = (first if len(marks) > 1 else start)
    t1, c1 = timed[-1]
    k = len(timed)
    per_step = {key: (c1[key] - c0[key]) / k for key in c1}
    return {"model": model_name, "description": description, "combiner": combiner, "n": n, "size": size,
            "solver": solver,
            "batch": batch, "steps_timed": k, "seconds_per_step": (t1 - t0) / k,
            "first_step_seconds": first[0] - start[0], "passes": per_step,
            "peak_mb": rss_mb() - rss_before, "rss_mb": rss_mb()}


def unit_costs(model_name: str, size: int, batch: int, threads: int, repeats: int = 3, model=None,
               double: bool = True) -> dict:
    """CPU seconds of one forward, one forward+backward and one forward+backward+double backward
    of the bare network at x_t (the cost units the floors are priced in); ``model``: an already built one
    of ``model_name``; ``double=False`` skips the double backward."""
    import torch

    from zmagic_core.models.shapes import ShapesModel
    from zmagic_core.models.pretrained.attention import attention_context

    torch.set_num_threads(threads)
    base = model if model is not None else build_model(model_name, size)[0]
    x = torch.randn(batch, *base.sample_shape)
    t = 500
    ctx = (lambda: attention_context(x.device, "math")) if not isinstance(base, ShapesModel) else None

    def forward():
        with torch.no_grad():
            base.eps(x, t)

    def backward():
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(base.eps(xx, t).pow(2).sum(), xx)

    def twice():
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(base.eps(xx, t).pow(2).sum(), xx, create_graph=True)
        torch.autograd.grad((g * torch.randn_like(g)).sum(), xx)

    out = {}
    parts = [("forward", forward), ("forward+backward", backward)] + ([("forward+backward+double", twice)] if double else [])
    for name, fn in parts:
        fn()  # warm-up
        start = time.process_time()
        for _ in range(repeats):
            if ctx is not None:
                with ctx():
                    fn()
            else:
                fn()
        out[name] = (time.process_time() - start) / repeats
    return out


# -- floors ----------------------------------------------------------------------------------------
def floor(combiner: str, n: int, solver: str = "ddpm") -> dict:
    """The fewest network passes per step the maths needs (one pass = one sample batch, one
    cotangent; the counts of batched VJPs are given separately).  Under ``ddim`` (eta = 0) the bound's
    trust region is empty: the bounded cases compute no Hessian term."""
    m = n * (n - 1)
    if solver == "ddim" and combiner in ("dependent", "dependent-autograd", "cagrad"):
        if combiner == "dependent-autograd":  # one unsplit VJP through s: (2, 3, 0)
            return {"forward": 2, "backward": 3, "double": 0}
        full = floor(combiner, n)  # the difference points need their forward only: m backward fewer
        return {**full, "backward": full["backward"] - (1 if combiner == "dependent" else m)}
    if combiner == "sum":  # one forward at x_t serves every g_i; n VJPs (adaptive rho_i needs each |grad E_i|)
        return {"forward": 1, "backward": n, "double": 0}
    if combiner == "dependent":  # g1 at x_t; g_tilde at x_hat; s and g1 at x + h g_tilde
        return {"forward": 3, "backward": 3, "double": 0}
    if combiner == "dependent-noH":  # the difference point needs s only
        return {"forward": 3, "backward": 2, "double": 0}
    if combiner == "dependent-paper":  # g1 (graph kept); g_tilde at x_hat (1 F + 1 B); one VJP through Phi (B + D)
        return {"forward": 2, "backward": 3, "double": 1}
    if combiner == "dependent-autograd":  # the VJP split: through s (B) and through g1 (D, which re-traverses the net: B)
        return {"forward": 2, "backward": 4, "double": 1}
    if combiner == "cagrad":  # n g_i; n x_hat_i (n F, m g_tilde); m difference points (m F, m B)
        return {"forward": 1 + n + m, "backward": n + 2 * m, "double": 0}
    if combiner == "cagrad-paper":  # n g_i (graph kept); x_hat_i per first condition: n F, m g_tilde; m VJPs
        return {"forward": 1 + n, "backward": n + 2 * m, "double": m}
    raise ValueError(combiner)


def cases(models, ns, combiners=COMBINERS, specs: Optional[dict] = None) -> list[tuple[str, str, int]]:
    """(model, combiner, n) to run; ``specs``: label -> CombinerSpec of the registry combiners named."""
    out = []
    for model in models:
        for n in ns:
            for combiner in combiners:
                if specs and combiner in specs:
                    if not specs[combiner].accepts(n):
                        continue
                elif combiner.startswith("dependent") and n != 2:
                    continue
                out.append((model, combiner, n))
    return out


def labels(combiners: Optional[str]) -> tuple[list[str], dict]:
    """The combiners to run and their specs: the four built-in cases, or the registry combiners
    named by ``--combiners`` (checked here, before anything runs) with sum first as the reference."""
    if not combiners:
        return list(COMBINERS), {}
    specs = {s.label: s for s in parse_combiners(combiners)}
    return (["sum"] if "sum" not in specs else []) + list(specs), specs


def child(args) -> int:
    if args.units:
        print(json.dumps({"model": args.child_model, "units": unit_costs(args.child_model, args.child_size,
                                                                          args.batch, args.threads)}))
        return 0
    print(json.dumps(run_case(args.child_model, args.child_combiner, args.child_n, args.child_size,
                              args.batch, args.child_steps, args.threads, args.solver)))
    return 0


def spawn(extra: list[str]) -> dict:
    cmd = [sys.executable, "-c", "import sys; from zmagic_core.app.bench.cost import main; "
           "sys.exit(main(sys.argv[1:]))"] + extra
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def sizes(args) -> dict:
    return {"shapes": 32, "tiny-unet": 32, "celebahq-unet": args.celebahq_size}


def model_steps(args, model: str) -> int:
    return args.celebahq_steps if model == "celebahq-unet" else args.steps


# -- the page ------------------------------------------------------------------------------------
def ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}"


def _wall(meta: dict) -> str:
    wall = meta.get("wall")
    return "not recorded" if wall is None else f"{wall / 60:.1f} min"


def page_section(args, meta: dict, rows, units) -> str:
    """The page's ``cost`` section; ``meta``: the run's record in cost.json (argv, machine, date, wall,
    version) and ``args`` its options (from the command line, or from cost.json on --replot)."""
    named = getattr(args, "combiners", None)
    solver = getattr(args, "solver", "ddpm")  # pages written before the option existed ran DDPM
    lines = [
        "## Cost: network passes, time and memory per guided step",
        "",
        f"Command: `{command('cost', meta.get('argv', []))}`  ",
        f"Machine: {meta.get('machine') or 'not recorded'}  ",
        f"Code: {code(meta)}  ",
        f"Date: {meta.get('date') or 'not recorded'}; wall time {_wall(meta)} (CPU shared with other jobs; ratios are within this run).",
        "",
        f"Batch {args.batch} sample(s) per step; first steps of a {SCHEDULE_STEPS[solver]}-step "
        f"{SOLVER_NAMES[solver]} schedule (t = {1000 - 1000 // SCHEDULE_STEPS[solver]}, "
        f"{1000 - 2 * 1000 // SCHEDULE_STEPS[solver]}, ...), "
        f"one warm-up step then {args.steps} timed step(s) ({args.celebahq_steps} for the CelebA-HQ UNet); "
        "adaptive step rule. Conditions, in order: " + ", ".join(f"{n} ({k})" for n, k, _ in CONDITIONS)
        + " (shapes-world energies on the decoded clean estimate; n = 2 uses the first two). "
        + (f"Combiners named by `--combiners {named}`, built through the plugin registry, each for the n it "
           "accepts; sum runs as the reference of the ratios; floors are given for the built-in cases only."
           if named else "cagrad uses c = 0.5."),
        "",
        "**How passes are counted.** The model's eps is wrapped: each call counts one forward pass. Identity "
        "`torch.autograd.Function`s on the network's input and output count one backward pass each time autograd "
        "traverses the network (output side) and one double backward each time a second-order gradient traverses "
        "the network's backward graph (a third identity, put on the input gradient by the input-side backward). "
        "The identities have vmap rules, so one `is_grads_batched` VJP with several cotangents counts as one pass. "
        "Counts are per step (mean over the timed steps). **Time**: process CPU seconds per step with one torch "
        "thread. **Memory**: growth of the process's peak resident set during the run (each case in a fresh "
        "subprocess), above the process after the model was built and cvxpy imported; it includes the warm-up step "
        "(cagrad: compiling its cvxpy problem, tens of MB). For the small models it is dominated by such "
        "one-off costs and allocator noise; only the CelebA-HQ-architecture figures say much.",
        "",
        "**Floors** (fewest passes per step the maths needs, one sample batch, one cotangent per pass):",
        "",
        "- sum: 1 forward at x_t serves every g_i; n backward passes (each g_i is its own VJP because the adaptive "
        "rho_i needs |grad E_i|; with the fixed rule one VJP of sum_i rho_i E_i would do). Floor (1, n, 0).",
        "- dependent (n = 2), the default (forward-difference product): 1 forward + 1 backward at x_t for g1 (g2 "
        "there is not needed for G, and is not computed unless the trace asks for it); x_hat = Phi(x_t, s + g1, z) "
        "is free; 1 forward + 1 backward for g_tilde at x_hat; 1 forward + 1 backward at x_t + h g_tilde (s, and g1 "
        "with rho_1 held) for the difference. Floor (3, 3, 0), no double backward; without the Hessian term the "
        "difference point needs its forward only: (3, 2, 0).",
        "- dependent-paper (the exact update): 1 forward at x_t kept with its graph; 1 backward for g1 "
        "(create_graph); 1 forward + 1 backward for g_tilde; the VJP <Phi, g_tilde> is 1 backward through the "
        "network (J_s^T g_tilde) plus 1 double backward (H_1 g_tilde traverses g1's backward graph). Floor (2, 3, 1). "
        "dependent-autograd (exact product with the bound) splits that VJP so the bound can act on the Hessian "
        "term alone: one more backward, (2, 4, 1).",
        "- cagrad (n conditions, m = n(n-1) ordered pairs), the default (difference products): 1 forward + n "
        "backward at x_t; n forwards at the x_hat_i and m g_tilde backward passes there; m difference points "
        "(m forwards, m backward passes): (1 + n + m, n + 2m, 0) in passes, but every x_hat_i goes through one "
        "stacked call (n - 1 backward calls over the stack) and every difference point through another (1 forward, "
        "1 backward), so the counted calls are (3, 2n, 0). cagrad-paper: 1 forward at x_t, n backward for the g_i "
        "(with graph); n forwards at the x_hat_i, m g_tilde backward passes; one VJP per pair (m backward + m double "
        "backward): (1 + n, n + 2m, m); batched VJPs (one `is_grads_batched` call per first condition) bring its "
        "counted calls below that.",
    ] + ([
        "- Under DDIM (eta = 0), this page's solver, the bound's trust region is empty (no noise in the step): "
        "dependent, dependent-autograd and cagrad compute no Hessian term, so the difference points need their "
        "forward only: dependent (3, 2, 0), dependent-autograd one unsplit VJP (2, 3, 0), cagrad "
        "(1 + n + m, n + m, 0); the paper's cases are unbounded and keep it.",
    ] if solver == "ddim" else []) + [
        "",
        "Cases: " + "; ".join(f"**{k}**: {v}" for k, v in CASE_HELP.items()) + ".",
        "",
        "Predicted time ratio at the floor: passes priced with the measured unit costs of the bare network "
        "(forward f, backward b = (forward+backward) - f, double d = (forward+backward+double) - (forward+backward)), "
        "divided by sum's floor priced the same way; the guidance maths outside the network is not priced. "
        "'Counted passes priced' prices the measured counts the same way (a batched call priced as one pass): "
        "where the measured time ratio is above it, the excess is work outside the network (the solver, the "
        "energies, vmap and the cvxpy solve of cagrad).",
        "",
    ]
    for model in args.models:
        mrows = [r for r in rows if r.get("model") == model and "error" not in r]
        errs = [r for r in rows if r.get("model") == model and "error" in r]
        u = units.get(model, {})
        desc = mrows[0]["description"] if mrows else ""
        lines += [f"### {model} ({sizes(args)[model]} px; {desc})", ""]
        if u and "error" not in u:
            f = u["forward"]
            b = u["forward+backward"] - f
            d = u["forward+backward+double"] - u["forward+backward"]
            lines += [f"Unit costs of the bare network at batch {args.batch}: forward {f * 1e3:.1f} ms, "
                      f"backward {b * 1e3:.1f} ms, double backward {d * 1e3:.1f} ms (CPU).", ""]
        else:
            f = b = d = None
        lines += ["| combiner | n | forward | backward | double | floor (F, B, D) | CPU s/step | time / sum | "
                  "floor time / sum (predicted) | counted passes priced / sum | peak MB | peak / sum |",
                  "|---|" + "---|" * 11]
        for r in mrows:
            s = next((x for x in mrows if x["combiner"] == "sum" and x["n"] == r["n"]), None)
            fl = floor(r["combiner"], r["n"], solver) if r["combiner"] in COMBINERS else None
            fl_sum = floor("sum", r["n"])
            pred = counted = "-"
            p = r["passes"]
            if f is not None:
                price = lambda q: q["forward"] * f + q["backward"] * b + q["double"] * d  # noqa: E731
                pred = ratio(price(fl), price(fl_sum)) if fl else "-"
                counted = ratio(price(p), s and price(s["passes"]))
            floor_cell = f"({fl['forward']}, {fl['backward']}, {fl['double']})" if fl else "-"
            lines.append(
                f"| {r['combiner']} | {r['n']} | {p['forward']:g} | {p['backward']:g} | {p['double']:g} | "
                f"{floor_cell} | {r['seconds_per_step']:.3f} | "
                f"{ratio(r['seconds_per_step'], s and s['seconds_per_step'])} | {pred} | {counted} | {r['peak_mb']:.0f} | "
                f"{ratio(r['peak_mb'], s and s['peak_mb']) if s and s['peak_mb'] > 50 else '-'} |")
        for r in errs:
            lines.append(f"| {r.get('combiner')} | {r.get('n')} | failed: {r['error']} |" + " |" * 9)
        lines.append("")
    return "\n".join(lines)


def cvxpy_timings(m: int = 6, batches=(1, 16, 64), repeats: int = 200, seed: int = 0) -> list[dict]:
    """Median seconds of the CAGrad dual per sample-problem: one problem at a time (batch 1, how every
    sample was solved before the step's problems were batched) and one block problem per step."""
    import numpy as np

    from zmagic_core.method.cagrad import cagrad_weights_batch

    rng = np.random.default_rng(seed)
    rows = []
    for batch in batches:
        grads = rng.normal(size=(repeats + 5, batch, m, 64)) + rng.normal(size=(1, 1, 1, 64))
        grams = grads @ np.swapaxes(grads, 2, 3)
        times = []
        for k, gram in enumerate(grams):
            started = time.perf_counter()
            cagrad_weights_batch(gram, 0.5)
            if k >= 5:  # the first solves include cvxpy's compilation
                times.append(time.perf_counter() - started)
        rows.append({"m": m, "batch": batch, "median_ms_per_problem": 1000 * float(np.median(times)) / batch})
    return rows


def cvxpy_section(meta: dict, rows) -> str:
    lines = ["## CAGrad's cvxpy solve: one problem per sample (before) and one block problem per step (after)", "",
             f"Command: `{command('cost', meta.get('argv', []))}`  ", f"Machine: {meta.get('machine') or 'not recorded'}  ",
             f"Code: {code(meta)}  ", f"Date: {meta.get('date') or 'not recorded'}", "",
             "m = 6 pair gradients (n = 3 conditions), c = 0.5, CLARABEL through one compiled cvxpy problem per "
             "(batch, m); median over the timed solves, compilation excluded. Batch 1 is the per-sample path the "
             "combiner used before a step's problems were solved together.", "",
             "| samples per solve | median ms per sample-problem |", "|---|---|"]
    lines += [f"| {r['batch']} | {r['median_ms_per_problem']:.3f} |" for r in rows]
    return "\n".join(lines)


ARGS = ("models", "n", "batch", "steps", "celebahq_size", "celebahq_steps", "threads", "combiners", "solver")


def parse(argv):
    p = argparse.ArgumentParser(prog="zmagic bench cost", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    p.add_argument("--n", nargs="*", type=positive_int, default=[2, 3, 4], help="numbers of conditions")
    p.add_argument("--combiners", default=None, metavar="NAME[:K=V...],...",
                   help="registry combiners instead of the four built-in cases, comma separated, e.g. "
                        "sum,cagrad:c=0.8,my-combiner (sum always runs: the ratios are to sum)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps after the warm-up step (small models)")
    p.add_argument("--celebahq-size", type=positive_int, default=64)
    p.add_argument("--celebahq-steps", type=positive_int, default=1)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--solver", choices=SOLVERS, default="ddpm",
                   help="ddpm (100 steps, the default) or ddim (eta = 0, 50 steps: the bound's trust region is "
                        "empty there, so the Hessian term's passes are skipped)")
    add_out_argument(p)
    p.add_argument("--no-page", action="store_true", help="print only (no page, no JSON)")
    p.add_argument("--cvxpy-only", action="store_true", help="only time the CAGrad dual (its own page section)")
    p.add_argument("--replot", action="store_true", help="no measurement: rewrite the cost and cvxpy sections of "
                   "the page from OUT/benchmarks/cost.json and cvxpy.json")
    # internal: one case in this process
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    p.add_argument("--child-combiner", help=argparse.SUPPRESS)
    p.add_argument("--child-n", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--child-size", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--units", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def replot(args, argv: list[str]) -> int:
    """The cost and cvxpy sections again from the results JSON (no new measurement)."""
    page, data = layout(args.out)
    note = (f"This section re-written on {now()} from {{name}} by `{command('cost', argv)}` "
            "(no new measurement).\n\n")
    written = []
    if (data / "cvxpy.json").exists():
        saved = json.loads((data / "cvxpy.json").read_text())
        text = cvxpy_section(saved.get("meta", {}), saved["rows"])
        write_section(page, "cvxpy", _with_note(text, note.format(name="cvxpy.json")))
        written.append("cvxpy")
    if (data / "cost.json").exists():
        saved = json.loads((data / "cost.json").read_text())
        meta = saved.get("meta", {})
        for key, value in meta.get("args", {}).items():
            setattr(args, key, value)
        text = page_section(args, meta, saved["rows"], saved["units"])
        write_section(page, "cost", _with_note(text, note.format(name="cost.json")))
        written.append("cost")
    if not written:
        raise InputError(f"nothing to re-write: no cost.json or cvxpy.json in {data} "
                         f"(run `zmagic bench cost --out {args.out}` first)")
    print(f"re-wrote the {' and '.join(written)} section(s) of {page}")
    return 0


def _with_note(text: str, note: str) -> str:
    """The section with ``note`` as the paragraph after its header lines (Command, Machine, Code, Date)."""
    head, sep, rest = text.partition("\n\n")  # the title
    block, sep2, rest2 = rest.partition("\n\n")  # Command .. Date
    return head + sep + block + sep2 + note + rest2


def main(argv: list[str]) -> int:
    argv = [a for a in argv if a != "--"]  # `zmagic bench X -- ARGS`: the separator may be passed through
    args = parse(argv)
    if args.child_model:
        return child(args)
    if args.replot:
        return replot(args, argv)
    combiners, specs = labels(args.combiners)  # checked before anything runs
    import torch

    torch.set_num_threads(args.threads)  # as in the children, so the page's machine line says so
    page, data = (None, None) if args.no_page else layout(args.out)
    solver_rows = cvxpy_timings()
    print(json.dumps(solver_rows), flush=True)
    if page is not None:
        meta = {"argv": list(argv), "date": now(), "machine": machine(), "version": version()}
        write_text(data / "cvxpy.json", json.dumps({"rows": solver_rows, "meta": meta}, indent=1))
        write_section(page, "cvxpy", cvxpy_section(meta, solver_rows))
    if args.cvxpy_only:
        return 0
    started = time.time()
    meta = {"argv": list(argv), "date": now(), "machine": machine(), "version": version(),
            "args": {key: getattr(args, key) for key in ARGS}}
    common = ["--batch", str(args.batch), "--threads", str(args.threads), "--solver", args.solver]
    rows, units = [], {}
    for model in args.models:
        size = sizes(args)[model]
        units[model] = spawn(["--child-model", model, "--child-size", str(size), "--units"] + common).get("units", {})
        print(f"[{time.time() - started:6.1f} s] {model} units {units[model]}", flush=True)
        for _, combiner, n in cases([model], args.n, combiners, specs):
            r = spawn(["--child-model", model, "--child-combiner", combiner, "--child-n", str(n),
                       "--child-size", str(size), "--child-steps", str(model_steps(args, model))] + common)
            r.setdefault("model", model)
            r.setdefault("combiner", combiner)
            r.setdefault("n", n)
            rows.append(r)
            print(f"[{time.time() - started:6.1f} s] {json.dumps(r)}", flush=True)
    if page is not None:
        meta["wall"] = time.time() - started
        write_text(data / "cost.json", json.dumps({"rows": rows, "units": units, "meta": meta}, indent=1))
        write_section(page, "cost", page_section(args, meta, rows, units))
        print(f"wrote {page} and {data / 'cost.json'}")
    return 0 if all("error" not in r for r in rows) else 1
