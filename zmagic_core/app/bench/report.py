"""Helpers shared by `zmagic bench quality` and `zmagic bench cost`.

Each benchmark module has ``main(argv) -> int`` and writes its report into one output folder,
``--out DIR`` (default ``./zmagic-bench``, relative to the current directory):

- ``DIR/benchmarks.md``: the page; each benchmark replaces only its own marked section
  (``<!-- name:begin -->`` .. ``<!-- name:end -->``), so the other sections and any text written
  by hand stay as they are;
- ``DIR/benchmarks/``: the figures and the results JSON (quality.json, cost.json, cvxpy.json),
  which ``--replot`` turns into the page section again without new runs.

The project's own page is ``docs/benchmarks.md``: the benchmarks run with ``--out docs``.
"""
from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import platform
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from zmagic_core.contracts.errors import ConfigError
from zmagic_core.files.atomic import write_bytes, write_text

DEFAULT_OUT = "zmagic-bench"
PAGE_NAME = "benchmarks.md"
DATA_NAME = "benchmarks"  # the folder beside the page: figures and JSON; the page links to DATA_NAME/<file>


def add_out_argument(parser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output folder: the page OUT/{PAGE_NAME} (only this benchmark's section is replaced) "
                             f"and OUT/{DATA_NAME}/ (figures, results JSON); default ./{DEFAULT_OUT}")


def layout(out) -> tuple[Path, Path]:
    """(page, data folder) of the output folder ``out``; the data folder is created."""
    root = Path(out)
    data = root / DATA_NAME
    data.mkdir(parents=True, exist_ok=True)
    return root / PAGE_NAME, data


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


def version() -> str:
    """The version of the installed zmagic-core that ran (the package's own version if not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("zmagic-core")
    except importlib.metadata.PackageNotFoundError:
        from zmagic_core import __version__

        return __version__


def code(meta: dict) -> str:
    """The 'Code:' line of a section from its results' metadata (older results recorded a git commit)."""
    if meta.get("version"):
        return f"zmagic-core {meta['version']}"
    if meta.get("revision"):
        return f"git {meta['revision']}"
    return "not recorded"


def command(which: str, argv: list[str]) -> str:
    return " ".join(["zmagic", "bench", which, *(shlex.quote(a) for a in argv)])


def write_section(page: Path, name: str, text: str) -> None:
    """Replace (or append) the section between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = page.read_text() if page.exists() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    page.parent.mkdir(parents=True, exist_ok=True)
    write_text(page, new)  # atomic: a kill mid-write leaves the old page, never a truncated one


def save_figure(fig, path: Path, **options) -> None:
    """``fig.savefig(path, **options)``, written atomically (the format from the file's suffix)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **options)
    write_bytes(path, buf.getvalue())


# -- argparse types: a count or a scale out of range is refused at parsing, never replaced by a default --
def positive_int(text: str) -> int:
    value = _parsed(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _parsed(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _parsed(text, float, "a number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _parsed(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


# -- combiners named on the command line -----------------------------------------------------------
RESERVED = ("none", "oracle")  # the quality benchmark's own baselines


@dataclass
class CombinerSpec:
    """A combiner given as ``name`` or ``name:key=value:key=value`` (a registry name and its options)."""

    label: str  # as written on the command line
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    registration: Any = None
    min_conditions: int = 1
    max_conditions: Optional[int] = None
    description: str = ""

    def build(self):
        from zmagic_core.contracts.components import BuildContext

        try:
            return self.registration.factory(BuildContext(), **self.options)
        except TypeError as exc:
            raise ConfigError(f"combiner {self.label!r} rejected its options: {exc}") from None

    def accepts(self, n: int) -> bool:
        return n >= self.min_conditions and (self.max_conditions is None or n <= self.max_conditions)

    def arity(self) -> str:
        if self.max_conditions is None:
            return f"at least {self.min_conditions}"
        if self.max_conditions == self.min_conditions:
            return f"exactly {self.min_conditions}"
        return f"{self.min_conditions} to {self.max_conditions}"


def _value(raw: str):
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_combiners(text: str, registry=None) -> list[CombinerSpec]:
    """Comma-separated combiners, each ``name[:key=value...]``, looked up in the plugin registry
    (installed plugins included), their options checked, each built once; ConfigError (one line)
    names what is wrong."""
    from pydantic import ValidationError

    from zmagic_core.plugins.registry import get_registry

    registry = registry or get_registry()
    specs: list[CombinerSpec] = []
    for label in (part.strip() for part in text.split(",")):
        if not label:
            continue
        name, *assignments = [p.strip() for p in label.split(":")]
        if name in RESERVED:
            raise ConfigError(f"--combiners: {name!r} is always run as a baseline; name registered combiners only")
        if label in (s.label for s in specs):
            raise ConfigError(f"--combiners: {label!r} is given twice")
        options = {}
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"--combiners: option {a!r} of {name!r} must look like key=value")
            key, raw = a.split("=", 1)
            options[key.strip()] = _value(raw.strip())
        reg = registry.get("combiner", name)  # UnknownComponentError (a ZmagicError) lists the names known
        if reg.options is not None:
            try:
                checked = reg.options.model_validate(options)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or name}: {e['msg']}" for e in exc.errors())
                allowed = ", ".join(reg.options.model_fields) or "none"
                raise ConfigError(f"--combiners: {label!r}: {problems} ({name} accepts: {allowed})") from None
            options = {k: getattr(checked, k) for k in checked.model_fields_set}
        spec = CombinerSpec(label, reg.name, options, reg)
        built = spec.build()  # fails here, before any sampling, if the factory does
        spec.min_conditions = getattr(built, "min_conditions", 1)
        spec.max_conditions = getattr(built, "max_conditions", None)
        doc = (type(built).__doc__ or "").strip().splitlines()
        origin = "built-in" if reg.plugin.startswith("zmagic_core.") else f"plugin `{reg.plugin}`"
        spec.description = (f"registry combiner `{reg.name}` ({origin})"
                            + (f", options {options}" if options else "") + (f": {doc[0]}" if doc else ""))
        specs.append(spec)
    if not specs:
        raise ConfigError("--combiners: no combiner named")
    return specs
