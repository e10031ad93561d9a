"""`zmagic tune EXPERIMENT --out DIR`: the command-line side of app/tune.py (registered by app/cli.py)."""
from __future__ import annotations

import os
from pathlib import Path

from zmagic_core.contracts.errors import ZmagicError


def cmd_tune(args) -> int:
    from zmagic_core.app.tune import run_tune

    try:
        run_tune(args.file, Path(args.out), args.set or [], progress=args.progress)
    except ZmagicError:
        if int(os.environ.get("RANK", "0") or 0) != 0:  # every process meets the same error: the main one reports it
            return 2
        raise
    return 0


def add_tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="search guidance scales (and combiner options) on an experiment's validation rows",
                       description="Search the space in the experiment file's tune section on its validation rows "
                                   "(every candidate is an experiment: resumable, reused when rerun, several "
                                   "processes with torchrun or accelerate launch), then compare the best recipe "
                                   "with the untuned one on the held-out rows. Writes best.yaml, "
                                   "tuned-experiment.yaml, candidates.md/.csv, tune.json, objective.png and "
                                   "report.md into DIR.")
    p.add_argument("file", help="experiment file (YAML or JSON) with a tune section")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--set", action="append", metavar="PATH=VALUE",
                   help="override a field of the file, e.g. tune.strategy.rounds=2 or tune.candidate.samples_per_row=2")
    p.add_argument("--progress", action="store_true", help="a progress bar per batch")
    p.set_defaults(func=cmd_tune)
