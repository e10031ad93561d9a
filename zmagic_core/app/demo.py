"""`zmagic demo` / `make demo`: the shapes world with two dependent conditions under every combiner."""
from __future__ import annotations

from pathlib import Path

from zmagic_core.assembly.build import load_recipe
from zmagic_core.app.runner import generate

DEMO_RECIPE = {
    "model": {"kind": "shapes"},
    "solver": {"kind": "ddpm", "steps": 100},
    # A colour classifier and the mask of a red circle: given x_t both depend on which prototype the
    # sample is heading to, so they are dependent (the paper's premise); only red circles satisfy both.
    "conditions": [
        {"kind": "shapes-attribute", "name": "red", "attribute": "color", "value": "red", "rule": "adaptive", "scale": 0.25},
        {"kind": "shapes-mask", "name": "mask", "reference": "red circle center", "rule": "adaptive", "scale": 0.25},
    ],
    "batch_size": 64,
}
COMBINERS = [("sum", {}), ("dependent", {}), ("cagrad", {"c": 0.5})]


def run_demo(out: Path, samples: int = 64, progress: bool = True) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # the shapes world's tensors are small: more threads only contend
    rows = []
    for kind, options in COMBINERS:
        overrides = [f"combiner.kind={kind}", f"num_samples={samples}"] + [f"combiner.{k}={v}" for k, v in options.items()]
        recipe = load_recipe(DEMO_RECIPE, overrides)
        record = generate(recipe, out / kind, progress=progress)
        summary = record["evaluation"]["shapes"]["summary"]
        rows.append({"combiner": kind, "joint": summary["joint_satisfaction"], "energy": summary["mean_energy"],
                     "on_manifold": summary["on_manifold"], "seconds": record["seconds"]})
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    names = list(rows[0]["energy"]) if rows else []
    header = ["combiner", "joint satisfaction"] + [f"energy {n}" for n in names] + ["on-manifold", "seconds"]
    lines = [header]
    for r in rows:
        lines.append([r["combiner"], f"{r['joint']:.3f}"] + [f"{r['energy'][n]:.3f}" for n in names]
                     + [f"{r['on_manifold']:.3f}", f"{r['seconds']:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
