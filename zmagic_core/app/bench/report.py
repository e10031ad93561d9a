"""Benchmarks behind `zmagic bench quality` and `zmagic bench cost` (docs/benchmarks.md).

Each module has ``main(argv) -> int``; both write their own marked section of docs/benchmarks.md
and their figures under docs/benchmarks/, so the page is always regenerated from real runs.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
from pathlib import Path


def machine() -> str:
    """One line describing where the benchmark ran."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (f"{cpu}, {os.cpu_count()} logical cores (torch threads {threads}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command(which: str, argv: list[str]) -> str:
    return "zmagic bench " + which + ("" if not argv else " -- " + " ".join(shlex.quote(a) for a in argv))


def write_section(page: Path, name: str, text: str) -> None:
    """Replace (or append) the section between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = page.read_text() if page.exists() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(new)


def revision() -> str:
    """The git commit of the code that ran, marked dirty when zmagic_core had local changes."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "zmagic_core"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" (zmagic_core with uncommitted changes)" if dirty else "")
