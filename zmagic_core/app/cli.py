"""The `zmagic` command: list plugins, generate from a recipe, run the demo and the benchmarks."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zmagic_core.contracts.errors import ZmagicError


def cmd_plugins(args) -> int:
    from zmagic_core.plugins.registry import get_registry

    rows = [("plugin", "version", "registers", "errors")]
    for info in get_registry().plugins():
        registers = "; ".join(f"{cat}: {', '.join(names)}" for cat, names in info.registers.items()) or "-"
        rows.append((info.name + (" (built-in)" if info.builtin else ""), info.version or "-", registers,
                     " | ".join(info.errors) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0


def cmd_generate(args) -> int:
    from zmagic_core.assembly.build import load_recipe
    from zmagic_core.app.runner import generate

    recipe = load_recipe(args.recipe, overrides=args.set or [])
    out = Path(args.out) if args.out else Path(recipe.output or f"outputs/{Path(args.recipe).stem}")
    record = generate(recipe, out, progress=False if args.no_progress else None)
    print(f"wrote {len(record['completed'])} of {len(record['seeds'])} samples to {out}")
    if record["failed"]:
        for index, message in record["failed"].items():
            print(f"sample {index} failed: {message}", file=sys.stderr)
    if "shapes" in record.get("evaluation", {}):
        s = record["evaluation"]["shapes"]["summary"]
        print(f"joint satisfaction {s['joint_satisfaction']:.3f}, on-manifold {s['on_manifold']:.3f}")
    return 1 if record["failed"] else 0


def cmd_demo(args) -> int:
    from zmagic_core.app.demo import run_demo

    run_demo(Path(args.out), samples=args.samples, progress=not args.no_progress)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zmagic", description="Zero-shot multi-condition guided diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins and what they register")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("generate", help="run a recipe (YAML or JSON)")
    p.add_argument("recipe", help="recipe file")
    p.add_argument("--out", help="output folder (default: the recipe's output, else outputs/<recipe name>)")
    p.add_argument("--set", action="append", metavar="PATH=VALUE", help="override a field, e.g. combiner.c=0.4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the shapes world under sum, dependent and cagrad, with a summary table")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    from zmagic_core.app.bench import add_bench_parser

    add_bench_parser(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ZmagicError as exc:
        print(f"zmagic: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
