"""`zmagic bench quality|cost`: the benchmarks (quality.py, cost.py; shared helpers in report.py).

Each writes its report into ``--out DIR`` (default ./zmagic-bench): its own section of
DIR/benchmarks.md and its figures and results JSON in DIR/benchmarks/.  The project's page,
docs/benchmarks.md, comes from running them with ``--out docs``.
"""
from __future__ import annotations

import argparse


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="quality and cost benchmarks, reported into --out DIR (default ./zmagic-bench)",
                       description="The rest of the line goes to the benchmark, e.g. `zmagic bench quality --quick "
                                   "--out /tmp/b`; `zmagic bench quality --help` lists its options.")
    p.add_argument("which", choices=["quality", "cost"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (e.g. --quick --out DIR)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import importlib

    module = importlib.import_module(f"zmagic_core.app.bench.{args.which}")
    return module.main(args.rest) or 0
