"""`zmagic experiment`, `zmagic eval` and `zmagic manifest`: the command-line side of experiments.

``add_experiment_parsers(sub)`` registers the three commands on the `zmagic` parser's subparsers.
Until app/cli.py calls it, ``python -m zmagic_core.app.experiment_command experiment ...`` runs them
(what ``torchrun ... -m`` and ``accelerate launch ... -m`` can launch).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from zmagic_core.contracts.errors import ZmagicError


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _non_negative(text: str) -> int:
    """argparse type: an integer >= 0 (as the experiment file's evaluation.bootstrap)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no intervals) or more, got {value}")
    return value


def cmd_experiment(args) -> int:
    from zmagic_core.app.experiment import folder_records, read_experiment, run_experiment

    try:
        exp = read_experiment(args.file, args.set or [])
        run_experiment(exp, Path(args.out), progress=args.progress, evaluate=not args.no_eval)
    except ZmagicError:
        if _rank() != 0:  # every process meets the same error: the main one reports it
            return 2
        raise
    # as `zmagic generate`: samples that failed (the others are written and evaluated) make the exit code 1
    failed = _rank() == 0 and any(record.get("failed") for _, record in folder_records(exp, Path(args.out)))
    return 1 if failed else 0


def cmd_eval(args) -> int:
    from zmagic_core.app.evaluation import evaluate_experiment
    from zmagic_core.app.experiment import load_experiment

    exp = load_experiment(Path(args.dir))
    if args.bootstrap is not None:
        exp.spec.evaluation.bootstrap = args.bootstrap
    result = evaluate_experiment(Path(args.dir), exp=exp, recompute=args.recompute)
    from zmagic_core.app.report import markdown_table, table_rows

    print(markdown_table(table_rows(result)))
    return 0


def cmd_manifest(args) -> int:
    from zmagic_core.app.manifest import BUILDERS, check_arguments, write_manifest

    check_arguments(args)
    rows = BUILDERS[args.table](args)
    write_manifest(rows, Path(args.out))
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


def add_experiment_parsers(sub) -> None:
    """Register `experiment`, `eval` and `manifest` on the `zmagic` command's subparsers."""
    p = sub.add_parser("experiment", help="a recipe x a manifest of rows x variants, generated and evaluated",
                       description="Generate every (variant, row, sample) of an experiment file into DIR "
                                   "(resumable; several processes with torchrun or accelerate launch), then "
                                   "evaluate it (metrics.json, report.md, figures/).")
    p.add_argument("file", help="experiment file (YAML or JSON)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--set", action="append", metavar="PATH=VALUE",
                   help="override a field of the experiment file, e.g. samples_per_row=4 or recipe.solver.steps=50")
    p.add_argument("--no-eval", action="store_true", help="generate only (run `zmagic eval DIR` later)")
    p.add_argument("--progress", action="store_true", help="a progress bar per batch and a line per unit")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("eval", help="evaluate an experiment folder: metrics.json, report.md, figures/")
    p.add_argument("dir", help="the folder `zmagic experiment` wrote")
    p.add_argument("--recompute", action="store_true",
                   help="run the per-run evaluators again (e.g. after installing an evaluator's weights)")
    p.add_argument("--bootstrap", type=_non_negative, help="bootstrap resamples (default: the experiment file's)")
    p.set_defaults(func=cmd_eval)

    from zmagic_core.app.manifest import add_manifest_arguments

    p = sub.add_parser("manifest", help="make an experiment manifest (JSONL) from a public dataset layout")
    add_manifest_arguments(p)
    p.set_defaults(func=cmd_manifest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zmagic", description="zmagic experiments (until cli.py registers them).")
    sub = parser.add_subparsers(dest="command", required=True)
    add_experiment_parsers(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ZmagicError as exc:
        print(f"zmagic: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
