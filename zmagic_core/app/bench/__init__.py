"""`zmagic bench`: the quality and cost benchmarks live in benchmarks/; this hooks them to the CLI."""
from __future__ import annotations


import argparse


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="quality and cost benchmarks (see docs/benchmarks.md)")
    p.add_argument("which", choices=["quality", "cost"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (e.g. --quick)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import importlib

    module = importlib.import_module(f"zmagic_core.app.bench.report.{args.which}")
    return module.main(args.rest) or 0
