"""Where a CAGrad step's time goes: the pass at x_t, the stacked x_hat_i points, the stacked difference
points and the cvxpy solve, beside sum's step and the bare network's cost per row at the stacks' batch
sizes (CPU seconds, one torch thread).

    python benchmarks/cagrad_stages.py                                  # CelebA-HQ UNet architecture, 64 px
    python benchmarks/cagrad_stages.py --model tiny-unet --steps 2 --json /tmp/stages.json

The same cases as `zmagic bench cost` (random weights, the shapes-world energies on the decoded clean
estimate, adaptive rule, CAGrad c = 0.5 at its defaults, the first steps of a 100-step DDPM schedule
after one warm-up step).  Prints a table and writes --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from zmagic_core.app.bench import cost
from zmagic_core.app.bench.quality import build_energy
from zmagic_core.files.atomic import write_text
from zmagic_core.method import combiners, guidance
from zmagic_core.method.guidance import Condition
from zmagic_core.method.solvers import DDPMSolver
from zmagic_core.models.shapes import ShapesModel
from zmagic_core.sampling.pipeline import Pipeline


class StageClock:
    """Process CPU seconds spent inside the wrapped functions, per call, in call order."""

    def __init__(self):
        self.calls: list[tuple[str, float]] = []
        self._undo = []

    def wrap(self, module, name: str, label: str):
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls.append((label, time.process_time() - start))

        setattr(module, name, timed)
        self._undo.append((module, name, original))

    def restore(self):
        for module, name, original in reversed(self._undo):
            setattr(module, name, original)


def network_per_row(model_name: str, model, batches: list[int], size: int) -> dict:
    """The bare network's forward and backward CPU seconds per row at each batch size (`zmagic bench cost`'s
    units: backward = (forward+backward) - forward)."""
    out = {}
    for batch in batches:
        units = cost.unit_costs(model_name, size, batch, threads=1, repeats=2, model=model, double=False)
        out[batch] = {"forward": units["forward"] / batch,
                      "backward": max(units["forward+backward"] - units["forward"], 0.0) / batch}
    return out


def step_stages(model, world, combiner: str, n: int, steps: int) -> dict:
    """Mean CPU seconds per timed step, and per stage of the step."""
    conditions = [Condition(name, build_energy(world, kind, opts), "adaptive", 0.25)
                  for name, kind, opts in cost.CONDITIONS[:n]]
    pipe = Pipeline(model, DDPMSolver(), cost.make_combiner(combiner), conditions, steps=100)
    pipe.schedule.timesteps = pipe.schedule.timesteps[:steps + 1]  # a warm-up step, then `steps` timed ones
    clock = StageClock()
    clock.wrap(guidance, "evaluate", "pass at x_t")
    clock.wrap(combiners, "evaluate_points", "stacked points")
    clock.wrap(combiners, "cagrad_directions", "cvxpy solve and direction")
    marks: list[tuple[float, int]] = []
    try:
        pipe.run([0], batch_size=1, progress=False,
                 callback=lambda _: marks.append((time.process_time(), len(clock.calls))))
    finally:
        clock.restore()
    (t0, c0), (t1, c1) = marks[0], marks[-1]
    timed = clock.calls[c0:c1]
    stages: dict[str, float] = {}
    points = 0
    for label, seconds in timed:
        if label == "stacked points":  # per step: the x_hat_i first, then the difference points
            label = ("x_hat points" if points % 2 == 0 else "difference points")
            points += 1
        stages[label] = stages.get(label, 0.0) + seconds / steps
    stages["other"] = (t1 - t0) / steps - sum(stages.values())
    return {"combiner": combiner, "n": n, "seconds_per_step": (t1 - t0) / steps, "stages": stages}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("tiny-unet", "celebahq-unet"), default="celebahq-unet")
    p.add_argument("--size", type=int, default=64, help="image size (default 64, as `zmagic bench cost`)")
    p.add_argument("--n", type=int, default=3, help="conditions (default 3)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if not 2 <= args.n <= len(cost.CONDITIONS) or args.steps < 1 or args.size < 8:
        p.error(f"--n must be in 2..{len(cost.CONDITIONS)}, --steps at least 1, --size at least 8")
    torch.set_num_threads(1)
    model, description = cost.build_model(args.model, args.size)
    world = ShapesModel(args.size)
    m = args.n * (args.n - 1)
    rows = network_per_row(args.model, model, [1, args.n, m], args.size)
    cases = [step_stages(model, world, name, args.n, args.steps) for name in ("sum", "cagrad")]
    total = {c["combiner"]: c["seconds_per_step"] for c in cases}
    print(f"{args.model} ({description}), {args.size} px, n = {args.n}, batch 1, one thread, CPU seconds")
    print("| bare network, per row | " + " | ".join(f"batch {b}" for b in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for part in ("forward", "backward"):
        print(f"| {part} | " + " | ".join(f"{r[part]:.3f}" for r in rows.values()) + " |")
    print()
    print("| combiner | s/step | time / sum | " + " | ".join(cases[1]["stages"]) + " |")
    print("|---|---|---|" + "---|" * len(cases[1]["stages"]))
    for c in cases:
        cells = [f"{c['stages'].get(k, 0.0):.3f}" for k in cases[1]["stages"]]
        print(f"| {c['combiner']} | {c['seconds_per_step']:.3f} | {c['seconds_per_step'] / total['sum']:.2f} | "
              + " | ".join(cells) + " |")
    if args.json:
        write_text(args.json, json.dumps({"model": args.model, "size": args.size, "n": args.n, "steps": args.steps,
                                          "network_per_row": rows, "cases": cases}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
