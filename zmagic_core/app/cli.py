"""The `zmagic` command: list plugins, check or generate a recipe, run the demo and the benchmarks.

Errors a user can act on (``ZmagicError``) print as one line ``zmagic: error: ...`` (at most
``MAX_MESSAGE`` characters) and exit with 2; ``zmagic check`` prints one such line per problem.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zmagic_core.contracts.errors import ZmagicError

MAX_MESSAGE = 2000


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """A message on one line: the lines of a multi-line message joined with '; ' (after a line ending in
    ':' or before one in parentheses, with a space), cut to ``limit`` characters."""
    lines = [" ".join(line.split()) for line in str(message).splitlines()]
    lines = [line for line in lines if line]
    text = lines[0] if lines else ""
    for line in lines[1:]:
        text += (" " if text.endswith(":") or line.startswith("(") else "; ") + line
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _error(message: str, kind: str = "error") -> None:
    print(f"zmagic: {kind}: {one_line(message)}", file=sys.stderr)


def _versions() -> str:
    import importlib.metadata

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    torch = version("torch")
    loaded = sys.modules.get("torch")
    if loaded is not None and getattr(loaded, "__version__", None):
        torch = str(loaded.__version__)
    return f"zmagic-core {version('zmagic-core')} (torch {torch}, Python {sys.version.split()[0]})"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_versions())
        parser.exit(0)


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
    from zmagic_core.app.runner import generate, problem_messages

    recipe = load_recipe(args.recipe, overrides=args.set or [])
    for note in recipe._plan.notes if recipe._plan is not None else ():
        _error(note, "warning")
    out = Path(args.out) if args.out else Path(recipe.output or f"outputs/{Path(args.recipe).stem}")
    record = generate(recipe, out, progress=False if args.no_progress else None)
    print(f"wrote {len(record['completed'])} of {len(record['seeds'])} samples to {out}")
    if record["failed"]:
        for index, message in record["failed"].items():
            print(f"sample {index} failed: {message}", file=sys.stderr)
    if "shapes" in record.get("evaluation", {}):
        s = record["evaluation"]["shapes"]["summary"]
        unjudged = s.get("not_judged") or []
        print(f"joint satisfaction {s['joint_satisfaction']:.3f}, on-manifold {s['on_manifold']:.3f}"
              + (f" (over the shapes-world conditions only; {', '.join(unjudged)} not judged)" if unjudged else ""))
    problems = record.get("problems") or {}
    for line in problem_messages(problems):  # nothing is dropped silently
        _error(line, "warning")
    if record["failed"]:
        return 1
    if problems.get("disabled_most") and not args.allow_disabled:
        _error(f"condition(s) {', '.join(problems['disabled_most'])} were disabled for most of the run; the samples "
               f"were not guided by them (rerun with --allow-disabled to accept this)")
        return 3
    return 0


def cmd_check(args) -> int:
    from zmagic_core.assembly.build import check_report, describe_plan

    problems, plan = check_report(args.recipe, overrides=args.set or [])
    if problems:
        for problem in problems:
            _error(problem)
        return 2
    for note in plan.notes:
        _error(note, "warning")
    print("ok")
    for line in describe_plan(plan):
        print(f"  {line}")
    return 0


def cmd_demo(args) -> int:
    from zmagic_core.app.demo import run_demo

    run_demo(Path(args.out), samples=args.samples, progress=not args.no_progress)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zmagic", description="Zero-shot multi-condition guided diffusion.")
    parser.add_argument("--version", action=_VersionAction, help="print the versions of zmagic-core and torch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins and what they register")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("generate", help="run a recipe (YAML or JSON)")
    p.add_argument("recipe", help="recipe file")
    p.add_argument("--out", help="output folder (default: the recipe's output, else outputs/<recipe name>)")
    p.add_argument("--set", action="append", metavar="PATH=VALUE", help="override a field, e.g. combiner.c=0.4")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-disabled", action="store_true",
                   help="exit 0 even when a condition was disabled (non-finite) for most of the run")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("check", help="check a recipe without loading anything: every problem, one per line")
    p.add_argument("recipe", help="recipe file")
    p.add_argument("--set", action="append", metavar="PATH=VALUE", help="override a field, e.g. combiner.c=0.4")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="the shapes world under sum, dependent and cagrad, with a summary table")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    from zmagic_core.app.bench import add_bench_parser

    add_bench_parser(sub)

    from zmagic_core.app.experiment_command import add_experiment_parsers

    add_experiment_parsers(sub)

    from zmagic_core.app.tune_command import add_tune_parser

    add_tune_parser(sub)

    from zmagic_core.app.ui_command import add_ui_parser

    add_ui_parser(sub)

    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, a usage error (argparse printed it)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return args.func(args)
    except ZmagicError as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:  # Ctrl-C: files are written atomically, so a rerun resumes; no traceback
        _error("interrupted (samples already written are kept: `generate` and `experiment` resume where they "
               "stopped)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
