"""`zmagic tune`: a search over guidance scales (and a combiner's options) on an experiment's
validation rows, then the best recipe against the untuned one on held-out rows.

The search is stated in the experiment file's ``tune`` section (``zmagic experiment`` ignores it)::

    tune:
      variant: dependent                 # the variant to tune (default: the first); its `set` is the untuned default
      objective:
        minimize: {tv_distance: 1.0}     # or maximize:; a weighted sum of evaluator metrics (metrics.json keys)
        constraints: ["on_manifold >= 0.95"]
      space:                             # a log grid (start, factor, maximum) or a list of values per parameter
        - {path: conditions.0.scale, start: 0.05, factor: 2, maximum: 1.6}
        - {path: [conditions.0.scale, conditions.1.scale], start: 0.05, maximum: 1.6}   # one value for both
        - {path: combiner.c, values: [0.2, 0.5, 0.8]}
      strategy: {kind: beam, beam: 2, rounds: 4, directions: up}   # or grid, or package.module:Class
      validation: 4                      # the first 4 rows, or a list of row ids
      held_out: [row-a, row-b]           # default: every row not used for validation ([] for none)
      candidate: {samples_per_row: 4, steps: 50}   # a candidate's size (steps: optional)

Each candidate is an experiment of one variant (the tuned variant's ``set`` plus the candidate's
values) on the validation rows, run by ``app/experiment.py``'s sharded, resumable runner in
``DIR/candidates/<id>/``, where ``<id>`` is a hash of that experiment's identity (base recipe, rows,
seed, the variant's resolved settings) and its size: rerunning a tune, or a changed tune whose
search meets the same candidate, reuses the finished ones.  The strategy only sees the history of
(values, objective, constraint violation), so a rerun proposes the same candidates in the same order.

``DIR`` receives: ``best.yaml`` (the best recipe, for ``zmagic generate``), ``tuned-experiment.yaml``
(the experiment with the untuned and tuned variants, for ``zmagic experiment``), ``candidates.md``,
``candidates.csv`` and ``tune.json`` (every candidate with its metrics), ``objective.png`` (the
objective over the search) and ``held-out/<id>/`` (the untuned and tuned variants on the held-out
rows, evaluated with the experiment's evaluation settings), summarised with a paired bootstrap
interval of the difference in ``report.md``.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zmagic_core.app.evaluation import bootstrap, row_result
from zmagic_core.app.experiment import (MARKER, Builder, EvaluationSpec, Experiment, Processes, Row, VariantSpec,
                                        read_experiment, run_experiment, validation_line)
from zmagic_core.app.identity import identity_hash
from zmagic_core.app.runner import RECORD, _read_json
from zmagic_core.contracts.errors import ConfigError
from zmagic_core.files.atomic import write_bytes, write_json, write_text

CANDIDATE = "candidate"          # the variant name inside a candidate's experiment
RESULT = "candidate.json"         # a finished candidate's metrics (written after its samples)
TUNE_ENTRIES = {"candidates", "held-out", "report.md", "best.yaml", "tuned-experiment.yaml", "candidates.md",
                "candidates.csv", "objective.png", "tune.json"}  # what a tune writes in its folder
CONSTRAINT = re.compile(r"^\s*([A-Za-z0-9_:.+\-]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")
PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$"


# -- the tune section --------------------------------------------------------------------------------
class ParameterSpec(BaseModel):
    """One searched parameter: recipe path(s) and a log grid (start, factor, maximum) or a list of values."""

    model_config = ConfigDict(extra="forbid")
    path: Union[str, list[str]] = Field(..., description="recipe path, or several that share one value")
    start: Optional[float] = Field(None, gt=0, description="first value of the log grid")
    factor: float = Field(2.0, gt=1, description="ratio of neighbouring grid values")
    maximum: Optional[float] = Field(None, gt=0, description="largest grid value")
    values: Optional[list[Any]] = Field(None, min_length=1, description="an ordered list instead of a grid")
    name: Optional[str] = Field(None, description="column label (default: the path)")

    @field_validator("path")
    @classmethod
    def _paths(cls, value):
        paths = [value] if isinstance(value, str) else value
        if not paths:
            raise ValueError("give at least one recipe path")
        for p in paths:
            if not re.match(PATH, p):
                raise ValueError(f"{p!r} is not a recipe path such as conditions.0.scale")
        return value

    @model_validator(mode="after")
    def _grid_or_values(self):
        if (self.values is None) == (self.start is None):
            raise ValueError("give either start (with maximum; factor optional) for a log grid, or values")
        if self.start is not None:
            if self.maximum is None:
                raise ValueError("a log grid needs maximum")
            if self.maximum < self.start:
                raise ValueError(f"maximum ({self.maximum}) is below start ({self.start})")
            if len(self.grid()) > 64:
                raise ValueError(f"the grid from {self.start} to {self.maximum} by {self.factor} has more than "
                                 "64 values")
        return self

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @property
    def label(self) -> str:
        return self.name or "=".join(self.paths)

    def grid(self) -> list[Any]:
        """The values in order: start * factor**k up to maximum (6 significant digits), or the list."""
        if self.values is not None:
            return list(self.values)
        out, k = [], 0
        while self.start * self.factor ** k <= self.maximum * (1 + 1e-9):
            out.append(float(f"{self.start * self.factor ** k:.6g}"))
            k += 1
        return out


class ObjectiveSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    minimize: Optional[dict[str, float]] = Field(None, description="metric -> weight of a sum to minimise")
    maximize: Optional[dict[str, float]] = Field(None, description="metric -> weight of a sum to maximise")
    constraints: list[str] = Field(default_factory=list, description='e.g. "on_manifold >= 0.95"')

    @model_validator(mode="after")
    def _one_direction(self):
        if (self.minimize is None) == (self.maximize is None):
            raise ValueError("give exactly one of minimize or maximize (metric: weight)")
        if not (self.minimize or self.maximize):
            raise ValueError("the objective names no metric")
        for text in self.constraints:
            if not CONSTRAINT.match(text):
                raise ValueError(f"constraint {text!r} must look like 'metric >= number' (>=, <=, > or <)")
        return self

    @property
    def sense(self) -> str:
        return "minimize" if self.minimize is not None else "maximize"

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.minimize if self.minimize is not None else self.maximize)

    def parsed_constraints(self) -> list[tuple[str, str, float]]:
        out = []
        for text in self.constraints:
            metric, op, value = CONSTRAINT.match(text).groups()
            out.append((metric, op, float(value)))
        return out

    def metrics(self) -> list[str]:
        return list(self.weights) + [m for m, _, _ in self.parsed_constraints()]

    def value(self, metrics: dict[str, float]) -> float:
        """The weighted sum as stated (NaN when a metric is missing or not finite)."""
        total = 0.0
        for key, weight in self.weights.items():
            x = metrics.get(key)
            if x is None or not math.isfinite(x):
                return float("nan")
            total += weight * x
        return total

    def loss(self, metrics: dict[str, float]) -> float:
        """The objective as a number to minimise."""
        v = self.value(metrics)
        return v if self.sense == "minimize" else -v

    def violation(self, metrics: dict[str, float]) -> float:
        """How far the constraints are from holding (0: all hold; a missing metric counts as infinitely far)."""
        total = 0.0
        for key, op, bound in self.parsed_constraints():
            x = metrics.get(key)
            if x is None or not math.isfinite(x):
                return float("inf")
            gap = bound - x if op in (">=", ">") else x - bound
            if gap > 0 or (op in (">", "<") and gap == 0):
                total += max(gap, 1e-12)
        return total


class StrategySpec(BaseModel):
    """``kind``: beam (default), grid, or ``package.module:Class``; the other fields go to it."""

    model_config = ConfigDict(extra="allow")
    kind: str = "beam"


class CandidateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples_per_row: int = Field(4, ge=1, description="samples per validation row")
    steps: Optional[int] = Field(None, ge=1, description="solver steps of a candidate (default: the recipe's)")


class TuneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: Optional[str] = Field(None, description="the variant tuned (default: the first)")
    objective: ObjectiveSpec
    space: list[ParameterSpec] = Field(..., min_length=1)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    validation: Union[int, list[str]] = Field(..., description="the first N rows, or their ids")
    held_out: Optional[Union[int, list[str]]] = Field(None, description="the last N rows, or their ids "
                                                      "(default: the rows not used for validation)")
    candidate: CandidateSpec = Field(default_factory=CandidateSpec)
    held_out_samples: Optional[int] = Field(None, ge=1, description="samples per held-out row "
                                            "(default: the experiment's samples_per_row)")

    @model_validator(mode="after")
    def _distinct_paths(self):
        paths = [p for s in self.space for p in s.paths]
        doubled = sorted({p for p in paths if paths.count(p) > 1})
        if doubled:
            raise ValueError(f"a path may appear in one parameter only; repeated: {', '.join(doubled)}")
        return self


def _one_line(exc: ValidationError, where: str) -> str:
    return f"invalid tune section in {where}: " + validation_line(exc, "tune")


# -- strategies ----------------------------------------------------------------------------------------
@dataclass
class Trial:
    """One evaluated candidate as a strategy sees it: its values (label -> value), the objective to
    minimise and how far the constraints are from holding (0: feasible)."""

    params: dict[str, Any]
    loss: float
    violation: float = 0.0

    @property
    def feasible(self) -> bool:
        return self.violation == 0.0

    def rank(self) -> tuple:
        """Sort key, best first: feasible, then the smaller violation, then the smaller loss (NaN last)."""
        return (not self.feasible, self.violation, self.loss if math.isfinite(self.loss) else math.inf)


class Strategy(Protocol):
    """A search strategy: ``propose`` gets every trial so far (in order) and returns the next
    candidates (label -> value), or none when it is done.  It must be a function of the history
    (and its options) only, so that a rerun proposes the same candidates and finds them done."""

    def propose(self, history: list[Trial]) -> list[dict[str, Any]]: ...


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


class BeamSearch:
    """TFG's beam search on a grid: start every parameter at its first grid value; each round, move
    one parameter of each of the ``beam`` best trials so far one grid step (``directions``: up, as
    TFG, or both) and propose the moves not tried yet; stop after ``rounds`` rounds or when the
    beam has no untried move."""

    def __init__(self, space: list[ParameterSpec], beam: int = 2, rounds: int = 4, directions: str = "up"):
        if int(beam) < 1 or int(rounds) < 0 or directions not in ("up", "both"):
            raise ConfigError(f"beam strategy: beam >= 1, rounds >= 0 and directions up|both "
                              f"(got beam={beam}, rounds={rounds}, directions={directions!r})")
        self.grids = {p.label: p.grid() for p in space}
        self.beam, self.rounds, self.directions = int(beam), int(rounds), directions

    def _index(self, label: str, value: Any) -> Optional[int]:
        for i, v in enumerate(self.grids[label]):
            if v == value or (isinstance(v, float) and isinstance(value, (int, float)) and math.isclose(v, value)):
                return i
        return None

    def _moves(self, history: list[Trial]) -> list[dict[str, Any]]:
        """The next proposals without the round limit: the start, else the beam's untried one-step moves."""
        start = {label: grid[0] for label, grid in self.grids.items()}
        tried = {_key(t.params) for t in history}
        if _key(start) not in tried:
            return [start]
        beam = sorted(history, key=Trial.rank)[:self.beam]
        steps = (1,) if self.directions == "up" else (1, -1)
        out = []
        for trial in beam:
            for label, grid in self.grids.items():
                i = self._index(label, trial.params.get(label))
                for step in steps:
                    if i is not None and 0 <= i + step < len(grid):
                        moved = dict(trial.params, **{label: grid[i + step]})
                        if _key(moved) not in tried:
                            tried.add(_key(moved))
                            out.append(moved)
        return out

    def propose(self, history: list[Trial]) -> list[dict[str, Any]]:
        # the round a history has reached: replay the search (each round's proposals follow the last's)
        calls, used = 0, 0
        while used < len(history):
            moves = self._moves(history[:used])
            if not moves:
                break
            used, calls = used + len(moves), calls + 1
        if calls > self.rounds:  # the start, then `rounds` rounds of moves
            return []
        return self._moves(history)


class GridSearch:
    """Every point of the grid (the product of the parameters' values), in one round."""

    def __init__(self, space: list[ParameterSpec], limit: int = 256):
        self.grids = {p.label: p.grid() for p in space}
        size = int(np.prod([len(g) for g in self.grids.values()]))
        if size > int(limit):
            raise ConfigError(f"grid strategy: the grid has {size} points, more than limit={limit}")

    def propose(self, history: list[Trial]) -> list[dict[str, Any]]:
        import itertools

        tried = {_key(t.params) for t in history}
        points = [dict(zip(self.grids, values)) for values in itertools.product(*self.grids.values())]
        return [p for p in points if _key(p) not in tried]


STRATEGIES = {"beam": BeamSearch, "grid": GridSearch}


def make_strategy(spec: StrategySpec, space: list[ParameterSpec]) -> Strategy:
    """The strategy a tune section names: beam, grid, or ``package.module:Class`` (built with the
    space and the section's other fields; it must have ``propose(history)``)."""
    options = dict(spec.model_extra or {})
    if spec.kind in STRATEGIES:
        factory = STRATEGIES[spec.kind]
    elif ":" in spec.kind:
        module, _, name = spec.kind.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"tune.strategy.kind: cannot load {spec.kind!r}: {exc}") from None
    else:
        raise ConfigError(f"tune.strategy.kind: unknown strategy {spec.kind!r}; known: "
                          f"{', '.join(STRATEGIES)}, or package.module:Class")
    try:
        strategy = factory(space, **options)
    except TypeError as exc:
        raise ConfigError(f"tune.strategy: {spec.kind} does not take these options: {exc}") from None
    if not callable(getattr(strategy, "propose", None)):
        raise ConfigError(f"tune.strategy.kind: {spec.kind!r} has no propose(history) method")
    return strategy


def search(strategy: Strategy, evaluate, max_rounds: int = 1000, log=None) -> list[Trial]:
    """Ask the strategy, evaluate its proposals (``evaluate(params) -> Trial``), repeat until it proposes
    nothing; returns the history in order."""
    history: list[Trial] = []
    for round_ in range(max_rounds):
        proposals = strategy.propose(list(history))
        if not proposals:
            break
        if log:
            log(f"round {round_}: {len(proposals)} candidate(s)")
        for params in proposals:
            history.append(evaluate(params, round_))
    return history


# -- the tune ---------------------------------------------------------------------------------------
@dataclass
class Tune:
    exp: Experiment
    spec: TuneSpec
    variant: VariantSpec
    validation: list[Row]
    held_out: list[Row]


def _pick_rows(exp: Experiment, choice, what: str, default: list[Row]) -> list[Row]:
    if choice is None:
        return default
    if isinstance(choice, int):
        if not 0 <= choice <= len(exp.rows):
            raise ConfigError(f"tune.{what}: {choice} rows asked, the experiment has {len(exp.rows)}")
        return exp.rows[:choice] if what == "validation" else exp.rows[len(exp.rows) - choice:]
    by_key = {r.key: r for r in exp.rows}
    unknown = [k for k in choice if k not in by_key]
    if unknown:
        raise ConfigError(f"tune.{what}: no row with id {', '.join(map(repr, unknown[:3]))}; "
                          f"ids: {', '.join(list(by_key)[:6])}{' ...' if len(by_key) > 6 else ''}")
    return [by_key[k] for k in choice]


def read_tune(path, overrides=()) -> Tune:
    """The experiment file and its checked ``tune`` section; ConfigError in one line names the problem."""
    exp = read_experiment(path, list(overrides))
    where = str(path)
    if exp.spec.tune is None:
        raise ConfigError(f"{where} has no tune section (see docs/experiments.md, Tuning)")
    try:
        spec = TuneSpec.model_validate(exp.spec.tune)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, where)) from None
    name = spec.variant or exp.spec.variants[0].name
    if name not in exp.variants:
        raise ConfigError(f"tune.variant: no variant {name!r}; variants: {', '.join(exp.variants)}")
    variant = exp.variants[name]
    validation = _pick_rows(exp, spec.validation, "validation", [])
    if not validation:
        raise ConfigError("tune.validation: choose at least one row")
    rest = [r for r in exp.rows if r.key not in {v.key for v in validation}]
    held_out = _pick_rows(exp, spec.held_out, "held_out", rest)
    both = sorted({r.key for r in validation} & {r.key for r in held_out})
    if both:
        raise ConfigError(f"tune: rows {', '.join(both[:3])} are both validation and held-out rows")
    make_strategy(spec.strategy, spec.space)  # options checked now, before any sampling
    tune = Tune(exp, spec, variant, validation, held_out)
    for param in spec.space:  # every path must exist in the variant's recipe
        for value in param.grid()[:1]:
            try:
                exp_c = candidate_experiment(tune, {param.label: value})
                exp_c.recipe(CANDIDATE, validation[0])
            except ConfigError as exc:
                raise ConfigError(f"tune.space {param.label}: {exc}") from None
    return tune


def _variant_set(tune: Tune, params: dict[str, Any]) -> dict[str, Any]:
    values = dict(tune.variant.set)
    for param in tune.spec.space:
        if param.label in params:
            for p in param.paths:
                values[p] = params[param.label]
    return values


def _sub_experiment(exp: Experiment, rows: list[Row], variants: list[VariantSpec], samples: int,
                    evaluation: EvaluationSpec) -> Experiment:
    spec = exp.spec.model_copy(update={"variants": variants, "samples_per_row": samples, "evaluation": evaluation,
                                       "tune": None, "name": None})
    return Experiment(spec, exp.path, exp.base, exp.recipe_dir, rows, exp.manifest)


def candidate_experiment(tune: Tune, params: dict[str, Any]) -> Experiment:
    """A candidate: one variant (the tuned one's set plus ``params``) on the validation rows, at the
    candidate size; no oracle and no bootstrap (only the row means are read)."""
    values = _variant_set(tune, params)
    if tune.spec.candidate.steps is not None:
        values["solver.steps"] = tune.spec.candidate.steps
    variant = VariantSpec(name=CANDIDATE, set=values)
    return _sub_experiment(tune.exp, tune.validation, [variant], tune.spec.candidate.samples_per_row,
                           EvaluationSpec(bootstrap=0, oracle=False))


def folder_id(exp: Experiment) -> str:
    """A candidate's folder name: a hash of its experiment's identity and size."""
    ident = {"identity": exp.identity(), "samples_per_row": exp.spec.samples_per_row}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _finished(folder: Path, exp: Experiment) -> Optional[dict]:
    """The stored metrics of a finished candidate of this identity, else None."""
    data = _read_json(folder / RESULT)
    marker = _read_json(folder / MARKER)
    if not isinstance(data, dict) or not isinstance(marker, dict):
        return None
    if marker.get("identity_sha256") != identity_hash(exp.identity()):
        return None
    if data.get("samples") != exp.spec.samples_per_row * len(exp.rows):
        return None
    return data


def candidate_metrics(exp: Experiment, folder: Path) -> dict:
    """Mean over the rows of each metric of the row folders' record.json (``app/evaluation.py``'s
    row values); ``samples``: the samples found complete."""
    per_row: dict[str, dict[str, float]] = {}
    samples = 0
    for row in exp.rows:
        run = exp.folder(folder, CANDIDATE, row)
        record = _read_json(run / RECORD)
        if not isinstance(record, dict):
            continue
        samples += len(record.get("completed") or [])
        for key, value in row_result(run, record).values.items():
            per_row.setdefault(key, {})[row.key] = value
    means = {}
    for key, rows in per_row.items():
        values = np.array([v for v in rows.values() if math.isfinite(v)], dtype=float)
        means[key] = float(values.mean()) if len(values) else float("nan")
    return {"metrics": means, "per_row": per_row, "samples": samples}


@dataclass
class Candidate:
    params: dict[str, Any]
    round: int
    id: str
    metrics: dict[str, float]
    objective: float
    violation: float
    reused: bool
    seconds: float
    set: dict[str, Any] = field(default_factory=dict)


def _processes(exp: Experiment) -> Processes:
    """This process among the launched ones, as run_experiment sees it (CPU or accelerator by the device)."""
    import torch

    device = exp.spec.device or exp.base.get("device") or "cpu"
    return Processes(cpu=torch.device(device).type == "cpu")


def run_tune(path, out, overrides=(), progress: bool = False, log=print) -> dict:
    """Search, write the tune's outputs into ``out``, compare on the held-out rows; returns tune.json's dict."""
    tune = read_tune(path, overrides)
    out = Path(out)
    strays = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in TUNE_ENTRIES) \
        if out.is_dir() else []
    if strays:  # a tune resumes in its own folder; it never writes among other files
        raise ConfigError(f"output folder {out} holds other files ({', '.join(strays[:3])}); choose another --out")
    procs = _processes(tune.exp)
    say = log if (procs.main and log) else (lambda *a, **k: None)
    objective = tune.spec.objective
    builder = Builder()
    started = time.perf_counter()
    candidates: list[Candidate] = []
    checked: list[bool] = []

    def run_candidate(params: dict[str, Any], round_: int, label: str = "") -> Candidate:
        exp = candidate_experiment(tune, params)
        ident = folder_id(exp)
        folder = out / "candidates" / ident
        began = time.perf_counter()
        data = _finished(folder, exp)
        reused = data is not None
        if data is None:
            run_experiment(exp, folder, progress=progress, evaluate=False, log=None, builder=builder)
            data = candidate_metrics(exp, folder)
            data.update(params=params, set=exp.spec.variants[0].set)
            if procs.main:
                write_json(folder / RESULT, data, indent=1)
            procs.barrier()
        metrics = data["metrics"]
        if not checked:  # the metrics the objective names must exist: say so once, in one line
            missing = [m for m in objective.metrics() if m not in metrics]
            if missing:
                raise ConfigError(f"tune.objective names metric(s) {', '.join(missing)} that the evaluators did not "
                                  f"report; they reported: {', '.join(sorted(metrics))}")
            checked.append(True)
        cand = Candidate(params, round_, ident, metrics, objective.value(metrics), objective.violation(metrics),
                         reused, time.perf_counter() - began, exp.spec.variants[0].set)
        shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "(untuned)"
        say(f"{label or f'round {round_}'}: {shown}: {objective.sense[:3]} {cand.objective:.4f}"
            + ("" if cand.violation == 0 else f", constraints violated by {cand.violation:.3g}")
            + (" (reused)" if reused else f" ({cand.seconds:.1f} s)"))
        return cand

    say(f"tune {tune.exp.name}: variant {tune.variant.name}, {len(tune.validation)} validation rows x "
        f"{tune.spec.candidate.samples_per_row} samples"
        + (f", {tune.spec.candidate.steps} steps" if tune.spec.candidate.steps else "")
        + f"; {len(tune.held_out)} held-out rows; strategy {tune.spec.strategy.kind}")
    default = run_candidate({}, -1, "untuned")

    def evaluate(params, round_):
        cand = run_candidate(params, round_)
        candidates.append(cand)
        return Trial(params, objective.loss(cand.metrics), cand.violation)

    strategy = make_strategy(tune.spec.strategy, tune.spec.space)
    history = search(strategy, evaluate)
    if not candidates:
        raise ConfigError("tune.strategy proposed no candidate")
    best = min(candidates, key=lambda c: Trial(c.params, objective.loss(c.metrics), c.violation).rank())
    search_seconds = time.perf_counter() - started
    say(f"best: {', '.join(f'{k}={v}' for k, v in best.params.items())}: {objective.sense[:3]} "
        f"{best.objective:.4f} (untuned {default.objective:.4f}); {len(candidates)} candidates, "
        f"{sum(c.reused for c in candidates)} reused, {search_seconds:.0f} s")

    held = None
    if tune.held_out:
        held = held_out_comparison(tune, best, out, builder, progress, say)
    result = {
        "experiment": tune.exp.name, "source": str(path), "variant": tune.variant.name,
        "objective": {"sense": objective.sense, "weights": objective.weights, "constraints": objective.constraints},
        "space": [p.model_dump(mode="json", exclude_none=True) for p in tune.spec.space],
        "strategy": tune.spec.strategy.model_dump(mode="json"),
        "validation_rows": [r.key for r in tune.validation], "held_out_rows": [r.key for r in tune.held_out],
        "candidate_size": tune.spec.candidate.model_dump(mode="json"),
        "default": _candidate_json(default), "candidates": [_candidate_json(c) for c in candidates],
        "best": _candidate_json(best), "search_seconds": search_seconds, "held_out": held,
        "seconds": time.perf_counter() - started, "rounds": max(c.round for c in candidates) + 1,
        "trials": len(history),
    }
    if procs.main:
        write_outputs(tune, out, result, best)
        say(f"wrote {out / 'report.md'}, best.yaml, tuned-experiment.yaml, candidates.md/.csv, objective.png "
            f"({result['seconds']:.0f} s)")
    procs.barrier()
    return result


def _candidate_json(c: Candidate) -> dict:
    return {"id": c.id, "round": c.round, "params": c.params, "set": c.set, "metrics": c.metrics,
            "objective": c.objective, "violation": c.violation, "feasible": c.violation == 0,
            "reused": c.reused, "seconds": c.seconds, "folder": f"candidates/{c.id}"}


# -- held-out comparison ---------------------------------------------------------------------------
def held_out_comparison(tune: Tune, best: Candidate, out: Path, builder, progress: bool, say) -> dict:
    """The untuned and tuned variants on the held-out rows at the experiment's full size and evaluation;
    per metric: each variant's mean with its bootstrap interval, and the paired bootstrap interval of
    the difference (tuned - untuned) over rows."""
    from zmagic_core.app.evaluation import evaluate_experiment

    exp = tune.exp
    variants = [VariantSpec(name="untuned", label=f"{tune.variant.name} untuned", set=dict(tune.variant.set)),
                VariantSpec(name="tuned", label=f"{tune.variant.name} tuned", set=_variant_set(tune, best.params))]
    samples = tune.spec.held_out_samples or exp.spec.samples_per_row
    sub = _sub_experiment(exp, tune.held_out, variants, samples, exp.spec.evaluation)
    folder = out / "held-out" / folder_id(sub)
    say(f"held-out: untuned vs tuned on {len(tune.held_out)} rows x {samples} samples -> {folder}")
    run_experiment(sub, folder, progress=progress, evaluate=False, log=None, builder=builder)
    metrics = None
    procs = _processes(exp)
    if procs.main:
        metrics = evaluate_experiment(folder, exp=sub, builder=builder, log=lambda *a, **k: None)
    procs.barrier()
    if metrics is None:
        metrics = _read_json(folder / "metrics.json")
    ev = exp.spec.evaluation
    objective = tune.spec.objective
    rows = [r.key for r in tune.held_out]
    per_row = metrics["per_row"]

    def row_values(variant, key):
        return [per_row.get(variant, {}).get(key, {}).get(r, float("nan")) for r in rows]

    def row_objective(variant):
        return [objective.value({k: per_row.get(variant, {}).get(k, {}).get(r, float("nan"))
                                 for k in objective.weights}) for r in rows]

    table = {}
    keys = ["objective"] + [k for k in metrics["metrics"]]
    for key in keys:
        a = row_objective("untuned") if key == "objective" else row_values("untuned", key)
        b = row_objective("tuned") if key == "objective" else row_values("tuned", key)
        diff = [y - x for x, y in zip(a, b)]
        entry = {"untuned": bootstrap(a, ev.bootstrap, ev.confidence, ev.seed),
                 "tuned": bootstrap(b, ev.bootstrap, ev.confidence, ev.seed),
                 "difference": bootstrap(diff, ev.bootstrap, ev.confidence, ev.seed)}
        if "oracle" in per_row:
            o = row_objective("oracle") if key == "objective" else row_values("oracle", key)
            entry["oracle"] = bootstrap(o, ev.bootstrap, ev.confidence, ev.seed)
        entry["label"] = "objective" if key == "objective" else metrics["metrics"][key]["label"]
        entry["better"] = ("lower" if objective.sense == "minimize" else "higher") if key == "objective" \
            else metrics["metrics"][key]["better"]
        table[key] = entry
    d = table["objective"]["difference"]
    better_sign = -1 if objective.sense == "minimize" else 1
    significant = d["low"] is not None and d["high"] is not None and (
        (d["high"] < 0) if better_sign < 0 else (d["low"] > 0))
    verdict = ("the tuned recipe is better than the untuned one on the held-out rows: the "
               f"{ev.confidence:.0%} paired bootstrap interval of the difference excludes 0" if significant else
               "the tuned recipe is NOT shown better on the held-out rows: the "
               f"{ev.confidence:.0%} paired bootstrap interval of the difference includes 0 or favours the untuned one")
    say(f"held-out objective: untuned {table['objective']['untuned']['value']:.4f}, tuned "
        f"{table['objective']['tuned']['value']:.4f}, difference {d['value']:+.4f} "
        f"[{d['low']:+.4f}, {d['high']:+.4f}]: {'significant' if significant else 'not significant'}")
    return {"folder": str(folder.relative_to(out)), "rows": rows, "samples_per_row": samples,
            "bootstrap": {"resamples": ev.bootstrap, "confidence": ev.confidence, "over": "rows", "paired": True},
            "table": table, "significant": bool(significant), "verdict": verdict}


# -- outputs -------------------------------------------------------------------------------------------
def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.4g}" if abs(x) < 1e-3 and x != 0 else f"{x:.3f}"


def _interval(entry: dict) -> str:
    text = _fmt(entry.get("value"))
    if entry.get("low") is not None and entry.get("high") is not None and entry["low"] != entry["high"]:
        text += f" [{_fmt(entry['low'])}, {_fmt(entry['high'])}]"
    return text


def recipe_of(tune: Tune, values: dict[str, Any]) -> dict:
    """The base recipe with a variant's values applied: a recipe `zmagic generate` runs (file options absolute)."""
    variant = VariantSpec(name="tuned", set=values)
    sub = _sub_experiment(tune.exp, tune.exp.rows[:1], [variant], tune.exp.spec.samples_per_row, EvaluationSpec())
    data = sub.recipe_data("tuned", Row(-1, "recipe", {}, None, "the tuned recipe"))
    data.pop("seeds", None)
    data.pop("output", None)
    data.pop("progress", None)
    data["num_samples"] = tune.exp.base.get("num_samples", tune.exp.spec.samples_per_row)
    return data


def tuned_experiment(tune: Tune, best: Candidate) -> dict:
    """The experiment file with the untuned and the tuned variant (no tune section), runnable from anywhere."""
    spec = tune.exp.spec.model_dump(mode="json", exclude_none=True, exclude={"tune"})
    spec["recipe"] = tune.exp.base
    if tune.exp.manifest is not None:
        spec["manifest"] = str(tune.exp.manifest)
    spec["name"] = f"{tune.exp.name}-tuned"
    values = ", ".join(f"{k}={v}" for k, v in best.params.items())
    spec["variants"] = [{"name": f"{tune.variant.name}-untuned", "set": dict(tune.variant.set)},
                        {"name": f"{tune.variant.name}-tuned", "set": _variant_set(tune, best.params),
                         "label": f"{tune.variant.name} tuned ({values})"}]
    return spec


def write_outputs(tune: Tune, out: Path, result: dict, best: Candidate) -> None:
    labels = [p.label for p in tune.spec.space]
    metric_keys = sorted({k for c in result["candidates"] + [result["default"]] for k in c["metrics"]},
                         key=lambda k: (k.startswith("guide:"), k))
    header = ["#", "round", "id"] + labels + ["objective", "feasible"] + metric_keys + ["reused", "seconds"]
    rows = []
    for n, c in enumerate([result["default"]] + result["candidates"]):
        rows.append([("untuned" if n == 0 else str(n)), str(c["round"]) if n else "-", c["id"]]
                    + [str(c["params"].get(k, "(recipe)")) for k in labels]
                    + [_fmt(c["objective"]), "yes" if c["feasible"] else f"no ({c['violation']:.3g})"]
                    + [_fmt(c["metrics"].get(k)) for k in metric_keys]
                    + ["yes" if c["reused"] else "no", f"{c['seconds']:.1f}"])
    best_row = 1 + next(i for i, c in enumerate(result["candidates"]) if c["id"] == best.id)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(f"**{x}**" if i == best_row else x for x in r) + " |" for i, r in enumerate(rows)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(out / "candidates.csv", buf.getvalue())
    write_text(out / "candidates.md", "\n".join(md) + "\n")
    write_json(out / "tune.json", result, indent=1)
    recipe = recipe_of(tune, _variant_set(tune, best.params))
    write_text(out / "best.yaml", f"# tuned by `zmagic tune {result['source']}`: {tune.variant.name} with "
               + ", ".join(f"{k}={v}" for k, v in best.params.items()) + "\n"
               + yaml.safe_dump(recipe, sort_keys=False))
    write_text(out / "tuned-experiment.yaml", yaml.safe_dump(tuned_experiment(tune, best), sort_keys=False))
    plot_search(result, out / "objective.png")
    obj = result["objective"]
    stated = " + ".join(f"{w:g} * {k}" for k, w in obj["weights"].items())
    lines = [f"# Tune: {result['experiment']} ({result['variant']})", "",
             f"Objective: {obj['sense']} {stated}"
             + (f", subject to {'; '.join(obj['constraints'])}" if obj["constraints"] else "") + ".  ",
             f"Strategy: {result['strategy']}; {len(result['candidates'])} candidates in {result['rounds']} rounds "
             f"({sum(c['reused'] for c in result['candidates'])} reused from an earlier run); search "
             f"{result['search_seconds']:.0f} s, total {result['seconds']:.0f} s.  ",
             f"Validation rows: {', '.join(result['validation_rows'])}; candidate size "
             f"{result['candidate_size']}.  ",
             f"Best: **{', '.join(f'{k}={v}' for k, v in best.params.items())}** (objective {_fmt(best.objective)}; "
             f"untuned {_fmt(result['default']['objective'])} on the same validation rows). Recipe: `best.yaml`; "
             "experiment with both variants: `tuned-experiment.yaml`.", ""]
    held = result.get("held_out")
    if held:
        boot = held["bootstrap"]
        lines += ["## Held-out rows", "",
                  f"{len(held['rows'])} rows ({', '.join(held['rows'])}) x {held['samples_per_row']} samples at the "
                  f"recipe's full size, in `{held['folder']}/`. Mean over rows with the {boot['confidence']:.0%} "
                  f"percentile bootstrap interval over rows ({boot['resamples']} resamples); the difference is "
                  "tuned - untuned, bootstrapped over rows in pairs.", "",
                  "| metric | untuned | tuned | difference (tuned - untuned) |"
                  + (" oracle (reference) |" if any("oracle" in e for e in held["table"].values()) else ""),
                  "|---|---|---|---|" + ("---|" if any("oracle" in e for e in held["table"].values()) else "")]
        for key, e in held["table"].items():
            arrow = {"lower": "↓", "higher": "↑"}.get(e["better"], "")
            lines.append(f"| {e['label']} {arrow} | {_interval(e['untuned'])} | {_interval(e['tuned'])} | "
                         f"{_interval(e['difference'])} |" + (f" {_interval(e['oracle'])} |" if "oracle" in e else ""))
        lines += ["", f"Verdict: {held['verdict']}.", ""]
    lines += ["## Candidates", "", f"Validation rows, candidate size; objective as stated ({obj['sense']}); "
              "the best in bold.", ""] + md + ["", "![objective over the search](objective.png)", ""]
    write_text(out / "report.md", "\n".join(lines))


def plot_search(result: dict, path: Path) -> None:
    """The objective of every candidate in the order evaluated (round by colour, infeasible hollow), the
    best feasible so far, and the untuned recipe's objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = result["candidates"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    rounds = sorted({c["round"] for c in cands})
    for r in rounds:
        idx = [i for i, c in enumerate(cands) if c["round"] == r]
        ok = [i for i in idx if cands[i]["feasible"]]
        bad = [i for i in idx if not cands[i]["feasible"]]
        color = f"C{r % 10}"
        ax.scatter([i + 1 for i in ok], [cands[i]["objective"] for i in ok], color=color, label=f"round {r}", zorder=3)
        ax.scatter([i + 1 for i in bad], [cands[i]["objective"] for i in bad], facecolors="none", edgecolors=color,
                   zorder=3, label=f"round {r}, constraint violated" if bad else None)
    sign = 1 if result["objective"]["sense"] == "minimize" else -1
    best, line = None, []
    for c in cands:
        if c["feasible"] and math.isfinite(c["objective"]) and (best is None or sign * c["objective"] < sign * best):
            best = c["objective"]
        line.append(best if best is not None else float("nan"))
    ax.step(range(1, len(cands) + 1), line, where="post", color="k", lw=1, label="best feasible so far")
    if math.isfinite(result["default"]["objective"]):
        ax.axhline(result["default"]["objective"], color="0.5", ls="--", lw=1, label="untuned recipe")
    ax.set_xlabel("candidate (in the order evaluated)")
    ax.set_ylabel(f"objective ({result['objective']['sense']})")
    ax.set_title(f"zmagic tune: {result['experiment']} ({result['variant']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
