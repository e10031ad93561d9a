"""Experiments: one base recipe x a manifest of rows x a list of variants, generated into run folders.

An experiment file (YAML or JSON, checked by :class:`ExperimentSpec` like a recipe)::

    recipe: base.yaml            # or the recipe itself, inline
    manifest: rows.jsonl         # or .csv; relative paths in it resolve against its own folder
    variants:
      - {name: sum, set: {combiner.kind: sum}}
      - {name: cagrad, set: {combiner.kind: cagrad, combiner.c: 0.5}}
    seed: 0                      # the experiment seed
    samples_per_row: 16

A row fills per-condition values through ``--set``-style paths (``{"conditions.0.value": "red",
"conditions.1.reference": "refs/x.png"}``); it may carry an ``id`` (its folder name) and its own
``seeds`` (exactly samples_per_row).  ``seed``, ``num_samples``, ``output`` and ``progress`` are the
experiment's: a row or variant setting one is refused.  The recipe of (variant, row) is the base
recipe, then the row's values, then the variant's (``apply_override`` for every path).  Sample ``i``
of a row gets the seed :func:`sample_seed` (experiment seed, row key, i) unless the row lists seeds:
never a function of the batch, the process or the order of work.

Layout of ``--out DIR``: ``experiment.json`` (the experiment's identity: base recipe, rows,
variants, seed; a changed experiment is refused, naming what differs), and one normal run folder
per variant and row, ``DIR/<variant>/<row>/`` (``app/runner.py``: recipe.json, sample_NNNN.*,
record.json, plots).  Work is split into units (variant, row, batch of samples) aligned to the
recipe's batches, so a unit's samples are drawn in the very batch ``zmagic generate`` would draw
them in; each process writes its own units (holding a per-unit lock in the run folder), and after a
barrier the main process aggregates every folder (record.json, plots, per-run evaluators) and
evaluates the experiment (``app/evaluation.py``).  Resume is per sample, as in the runner.

Before anything is written, a pre-flight checks every (variant, row): the recipe's fields, kinds
(a missing plugin), options, referenced files, and builds the model and each condition once
(missing weights); every problem is reported together and nothing is left behind.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zmagic_core.app.evaluation import FIGURES, METRICS, ORACLE, REPORT
from zmagic_core.app.identity import folder_identity, identity_differences, identity_hash, referenced_files
from zmagic_core.app.runner import (RECORD, _aggregate, _check_marker, _Folder, _final_energies, _make_folder,
                                    _read_json, _trusted, lock_folder, problem_messages)
from zmagic_core.assembly.build import DTYPES, CheckedRecipe, check_recipe
from zmagic_core.assembly.recipe import Recipe, apply_override, read_recipe
from zmagic_core.contracts.components import BuildContext
from zmagic_core.contracts.errors import ConfigError, InputError, ZmagicError
from zmagic_core.files.atomic import clean_temporaries, write_json
from zmagic_core.method.guidance import Condition
from zmagic_core.sampling.pipeline import Pipeline

FORMAT = 1
MARKER = "experiment.json"
EXPERIMENT_LOCK = ".zmagic-experiment.lock"
ROW_RESERVED = ("id", "seeds")
# what the experiment folder holds beside the variants' folders (and the oracle's key in metrics.json)
RESERVED_NAMES = (MARKER, METRICS, REPORT, FIGURES, ORACLE)
# recipe fields the experiment decides for every (variant, row): a row or variant setting one would be overwritten
EXPERIMENT_OWNED = {"seed": "sample seeds come from the experiment's seed (or a row's own `seeds` list)",
                    "num_samples": "the number of samples per row is the experiment's samples_per_row",
                    "seeds": "sample seeds come from the experiment's seed (or a row's own `seeds` list)",
                    "output": "the output folder is `zmagic experiment --out`",
                    "progress": "progress is `zmagic experiment --progress`"}
# a string value ending like this names a file (row values resolve against the manifest's folder)
FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".npy", ".npz", ".json",
                 ".txt", ".pt", ".pth", ".tar", ".safetensors", ".bin", ".ckpt", ".onnx", ".dat")
NAME = r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"


# -- the file ---------------------------------------------------------------------------------
def owned_path(path: str) -> Optional[str]:
    """Why a row or variant may not set ``path`` (a field the experiment decides), else None."""
    return EXPERIMENT_OWNED.get(path.split(".")[0])


class VariantSpec(BaseModel):
    """One method setting: recipe fields overridden by ``--set``-style paths."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=NAME, description="folder name and label of the variant")
    set: dict[str, Any] = Field(default_factory=dict, description="path -> value, e.g. combiner.kind: cagrad")
    label: Optional[str] = Field(None, description="label in the report (default: the name)")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value):
        # case-insensitive: on a case-insensitive file system Figures/ is figures/
        if value.lower() in (n.lower() for n in RESERVED_NAMES):
            raise ValueError(f"{value!r} is reserved (the experiment folder's own {', '.join(RESERVED_NAMES)}); "
                             "choose another name")
        return value

    @field_validator("set")
    @classmethod
    def _not_owned(cls, value):
        for path in value:
            if owned_path(path):
                raise ValueError(f"{path!r} cannot be set by a variant: {owned_path(path)}")
        return value


class FidSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: str = Field(..., description="folder of reference images (e.g. CelebA-HQ)")
    weights: Optional[str] = Field(None, description="Inception weights file (torch-fidelity's "
                                   "weights-pt_inception-2015-12-05-6726825d.pth); default: looked up by that name")
    max_reference: Optional[int] = Field(None, ge=2, description="use at most this many reference images")
    batch_size: int = Field(32, ge=1)


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples over rows for the intervals (0: none)")
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = Field(0, ge=0, description="seed of the bootstrap resampling")
    oracle: bool = Field(True, description="shapes world: the exact conditional sampler as the reference row")
    fid: Optional[FidSpec] = None


class ExperimentSpec(BaseModel):
    """An experiment file's fields."""

    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = None
    recipe: Union[str, dict[str, Any]] = Field(..., description="base recipe: a file (relative to this file) or inline")
    manifest: Optional[str] = Field(None, description="rows file (.jsonl or .csv), relative to this file")
    rows: Optional[list[dict[str, Any]]] = Field(None, description="rows inline, instead of a manifest")
    variants: list[VariantSpec] = Field(..., min_length=1)
    seed: int = Field(0, ge=0, description="experiment seed: sample seeds are a hash of (seed, row, index)")
    samples_per_row: int = Field(4, ge=1)
    batch_size: Optional[int] = Field(None, ge=1, description="overrides the recipe's batch_size")
    device: Optional[str] = Field(None, description="overrides the recipe's device")
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads per process (not in the identity)")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    tune: Optional[dict[str, Any]] = Field(None, description="the `zmagic tune` section (checked by app/tune.py; "
                                           "`zmagic experiment` ignores it; not in the identity)")

    @model_validator(mode="after")
    def _one_source_of_rows(self):
        if (self.manifest is None) == (self.rows is None):
            raise ValueError("give exactly one of 'manifest' (a .jsonl or .csv file) or 'rows' (inline)")
        names = [v.name for v in self.variants]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(doubled)}")
        return self

    @field_validator("manifest")
    @classmethod
    def _manifest_suffix(cls, value):
        if value is not None and Path(value).suffix.lower() not in (".jsonl", ".csv", ".json"):
            raise ValueError(f"manifest must be a .jsonl or .csv file, got {value!r}")
        return value


def validation_line(exc: ValidationError, root: str = "") -> str:
    """A pydantic error as one line: every failing field with its message and value; ``root``
    prefixes each field path (e.g. "tune")."""
    parts = []
    for err in exc.errors():
        loc = ".".join([root] * bool(root) + [str(p) for p in err["loc"]]) or "experiment"
        value = err.get("input")
        shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}{shown}")
    return "; ".join(parts)


def _one_line(exc: ValidationError, where: str) -> str:
    return f"invalid experiment {where}: " + validation_line(exc)


@dataclass
class Row:
    index: int
    key: str                       # folder name and seed key: the row's id, else row-NNNN
    values: dict[str, Any]         # path -> value, file values resolved against the manifest's folder
    seeds: Optional[list[int]]
    source: str                    # where it came from, for messages ("rows.jsonl line 4")


@dataclass
class Unit:
    """A piece of work: one variant, one row, one batch of sample indices (a batch of the recipe)."""

    variant: str
    row: int
    indices: list[int]

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.row}/{self.indices[0]}"


def sample_seed(experiment_seed: int, row_key: str, index: int) -> int:
    """The seed of sample ``index`` of a row: a hash of (experiment seed, row key, index), 31 bits."""
    text = f"zmagic-experiment:{int(experiment_seed)}:{row_key}:{int(index)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def _looks_like_file(value: str) -> bool:
    return value.lower().endswith(FILE_SUFFIXES) or value.startswith(("./", "../", "/", "~"))


def resolve_file_value(value: Any, base: Path) -> Any:
    """A string that names a file (it exists beside ``base`` or ends like a file) as an absolute path."""
    if not isinstance(value, str) or not value or "\n" in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = base / path
    if candidate.exists() or _looks_like_file(value):
        return str(candidate.resolve() if candidate.exists() else candidate.absolute())
    return value


def _parse_cell(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, (dict,)) else value


def read_rows(path: Path) -> list[tuple[dict, str]]:
    """(row dict, where) of a .jsonl (one JSON object a line) or .csv (a header of paths) manifest."""
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read manifest {path}: {exc}") from None
    rows = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise ConfigError(f"manifest {path}: no header line (the column names are recipe paths)")
        columns = len(reader.fieldnames)
        names = [c.strip() for c in reader.fieldnames]
        doubled = sorted({c for c in names if names.count(c) > 1})
        if doubled:  # csv keeps only the last of two equal columns
            raise ConfigError(f"manifest {path} line 1: column(s) {', '.join(map(repr, doubled))} given twice")
        for record in reader:
            n = reader.line_num  # the record's (last) line in the file, blank lines counted
            values = list(record.values())
            if None not in record and not (values[0] or "").strip() and values[1:] == [None] * (columns - 1):
                continue  # a line of spaces: blank, as csv skips empty lines
            if None in record or None in values:  # a short row would fall back to base values unseen
                cells = columns - values.count(None) + len(record.get(None) or [])
                raise ConfigError(f"manifest {path} line {n}: {cells} cell(s), the header has {columns} columns")
            # an empty cell leaves the path at the base recipe's value (docs/experiments.md)
            row = {k.strip(): _parse_cell(v) for k, v in record.items() if v.strip() != ""}
            if isinstance(row.get("seeds"), str):
                row["seeds"] = [s for s in re.split(r"[\s;,]+", row["seeds"]) if s]
            rows.append((row, f"{path.name} line {n}"))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"manifest {path} line {n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"manifest {path} line {n}: a row must be a JSON object of path: value")
            rows.append((row, f"{path.name} line {n}"))
    if not rows:
        raise ConfigError(f"manifest {path} has no rows")
    return rows


def _check_row(raw: dict, index: int, where: str, base: Path, samples: int) -> Row:
    values, seeds, key = {}, None, f"row-{index:04d}"
    for k, v in raw.items():
        if k == "id":
            key = str(v)
            if not re.match(NAME, key):
                raise ConfigError(f"{where}: id {v!r} cannot name a folder (letters, digits, . _ + - only)")
        elif k == "seeds":
            try:
                seeds = [int(s) for s in (v if isinstance(v, list) else [v])]
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: seeds must be a list of integers, got {v!r}") from None
            if len(seeds) != samples or any(s < 0 for s in seeds):  # extra seeds would be dropped unseen
                raise ConfigError(f"{where}: seeds lists {len(seeds)} seeds, the experiment needs {samples} "
                                  "non-negative ones (samples_per_row: exactly one per sample)")
        elif not isinstance(k, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", k):
            raise ConfigError(f"{where}: {k!r} is not a recipe path such as conditions.0.value")
        elif owned_path(k):
            raise ConfigError(f"{where}: {k!r} cannot be set by a row: {owned_path(k)}")
        else:
            values[k] = resolve_file_value(v, base)
    return Row(index, key, values, seeds, where)


class Experiment:
    """A checked experiment file: its spec, the base recipe (as data) and the rows."""

    def __init__(self, spec: ExperimentSpec, path: Optional[Path], base: dict, recipe_dir: Path,
                 rows: list[Row], manifest: Optional[Path]):
        self.spec, self.path, self.base, self.recipe_dir = spec, path, base, recipe_dir
        self.rows, self.manifest = rows, manifest
        self.variants = {v.name: v for v in spec.variants}
        self._recipes: dict[tuple[str, int], Recipe] = {}

    @property
    def name(self) -> str:
        return self.spec.name or (self.path.stem if self.path else "experiment")

    def seeds(self, row: Row) -> list[int]:
        if row.seeds is not None:
            return list(row.seeds)
        return [sample_seed(self.spec.seed, row.key, i) for i in range(self.spec.samples_per_row)]

    def recipe_data(self, variant: str, row: Row) -> dict:
        """The recipe of (variant, row) as data: base, then the row's values, then the variant's."""
        data = json.loads(json.dumps(self.base))
        for where, values in ((row.source, row.values), (f"variant {variant}", self.variants[variant].set)):
            for path, value in values.items():
                try:
                    apply_override(data, f"{path}={json.dumps(value)}")
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
        data["seeds"] = self.seeds(row)
        data.pop("num_samples", None)
        data.update(output=None, progress=False)
        if self.spec.batch_size is not None:
            data["batch_size"] = self.spec.batch_size
        if self.spec.device is not None:
            data["device"] = self.spec.device
        for spec in [data.get("model")] + list(data.get("conditions") or []):
            if isinstance(spec, dict):  # file-like option values of the base recipe: against its folder
                for key, value in list(spec.items()):
                    if key not in ("kind", "name") and isinstance(value, str) and _looks_like_file(value):
                        here = Path(value).expanduser()
                        if not here.is_absolute() and not here.exists():
                            spec[key] = resolve_file_value(value, self.recipe_dir)
        return data

    def recipe(self, variant: str, row: Row, device: Optional[str] = None) -> Recipe:
        key = (variant, row.index)
        if key not in self._recipes:
            data = self.recipe_data(variant, row)
            if device is not None:
                data["device"] = device
            try:
                recipe = read_recipe(data)
            except ConfigError as exc:
                raise ConfigError(f"variant {variant}, {row.source}: {exc}".replace("\n", " ")) from None
            recipe._source_dir = str(self.recipe_dir)
            self._recipes[key] = recipe
        return self._recipes[key]

    def folder(self, out: Path, variant: str, row: Row) -> Path:
        return Path(out) / variant / row.key

    def units(self, batch_size_of) -> list[Unit]:
        """Every (variant, row, batch) in order; ``batch_size_of(variant, row)`` gives the recipe's batch."""
        units = []
        for variant in self.variants:
            for row in self.rows:
                n, b = len(self.seeds(row)), batch_size_of(variant, row)
                units += [Unit(variant, row.index, list(range(s, min(s + b, n)))) for s in range(0, n, b)]
        return units

    def identity(self) -> dict:
        """What decides the experiment's samples (not how many per row, batch, device or threads)."""
        base = {k: v for k, v in self.base.items()
                if k not in ("seed", "num_samples", "seeds", "batch_size", "output", "progress", "device")}
        return {"recipe": base, "seed": self.spec.seed,
                "variants": {v.name: v.set for v in self.spec.variants},
                "rows": {r.key: {"values": r.values, "seeds": r.seeds} for r in self.rows}}


def read_experiment(source: Union[str, Path, dict], overrides: tuple[str, ...] | list[str] = ()) -> Experiment:
    """Read and check an experiment file (``overrides``: ``path=value`` as ``--set``); ConfigError names
    the field.  Kinds and options are checked later, by :func:`preflight`."""
    if isinstance(source, dict):
        data, path, where = json.loads(json.dumps(source)), None, "(inline)"
        folder = Path.cwd()
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise InputError(f"experiment file not found: {path}")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot parse experiment {path}: {str(exc).splitlines()[0]}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read experiment {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"experiment {path} must be a mapping of fields, got {type(data).__name__}")
        folder = path.resolve().parent
    recipe_dir = folder
    if isinstance(data.get("recipe"), str):  # a recipe file: read it in, so --set recipe.x=... works
        recipe_path = (folder / data["recipe"]).expanduser()
        if not recipe_path.is_file():
            raise InputError(f"{where}: recipe: file not found: {recipe_path}")
        try:
            text = recipe_path.read_text()
            data["recipe"] = json.loads(text) if recipe_path.suffix == ".json" else yaml.safe_load(text) or {}
        except (yaml.YAMLError, json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: recipe: cannot read {recipe_path}: {str(exc).splitlines()[0]}") from None
        recipe_dir = recipe_path.resolve().parent
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, where)) from None
    if not isinstance(spec.recipe, dict):
        raise ConfigError(f"invalid experiment {where}: recipe: must be a mapping or a file name")
    manifest = None
    if spec.manifest is not None:
        manifest = (folder / spec.manifest).expanduser().resolve()
        raw_rows, base = read_rows(manifest), manifest.parent
    else:
        raw_rows, base = [(r, f"rows.{i}") for i, r in enumerate(spec.rows or [])], folder
        if not raw_rows:
            raise ConfigError(f"invalid experiment {where}: rows: the list is empty")
    if spec.evaluation.fid is not None:  # FID's files resolve against the experiment file's folder
        fid = spec.evaluation.fid
        fid.reference = str((folder / fid.reference).expanduser())
        fid.weights = str((folder / fid.weights).expanduser()) if fid.weights else None
    rows = [_check_row(raw, i, w, base, spec.samples_per_row) for i, (raw, w) in enumerate(raw_rows)]
    keys = [r.key for r in rows]
    doubled = sorted({k for k in keys if keys.count(k) > 1})
    if doubled:
        raise ConfigError(f"invalid experiment {where}: row ids must be unique; repeated: {', '.join(doubled[:5])}")
    return Experiment(spec, path, spec.recipe, recipe_dir, rows, manifest)


def load_experiment(out: Union[str, Path]) -> Experiment:
    """The experiment an output folder holds, from its experiment.json (rows and paths as resolved)."""
    out = Path(out)
    data = _read_json(out / MARKER)
    if not isinstance(data, dict) or not isinstance(data.get("identity"), dict) or "experiment" not in data:
        raise InputError(f"{out} is not an experiment folder (no readable {MARKER}); "
                         f"run `zmagic experiment FILE --out {out}` first")
    ident = data["identity"]
    rows = [Row(i, key, dict(r.get("values") or {}), r.get("seeds"), f"row {key}")
            for i, (key, r) in enumerate((ident.get("rows") or {}).items())]
    spec_data = dict(data["experiment"], recipe=data["recipe"], manifest=None, name=data.get("name"),
                     rows=[{"id": r.key, **r.values, **({"seeds": r.seeds} if r.seeds else {})} for r in rows])
    try:
        spec = ExperimentSpec.model_validate(spec_data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, str(out / MARKER))) from None
    exp = Experiment(spec, None, data["recipe"], Path(data.get("recipe_dir") or out), rows, None)
    if identity_hash(exp.identity()) != data.get("identity_sha256"):
        raise ConfigError(f"{out / MARKER} does not match its own identity hash; it was edited or damaged")
    return exp


# -- building, with the model kept across rows ---------------------------------------------------
class Builder:
    """Builds pipelines like ``assembly.build.build_pipeline``, keeping each base model (by kind,
    options, device and dtype) across rows: a pretrained model is loaded once per process."""

    def __init__(self):
        self.models: dict[str, Any] = {}

    @staticmethod
    def _key(plan: CheckedRecipe, where: str) -> str:
        reg, options = plan.parts[where]
        return json.dumps([reg.category, reg.name, options, plan.recipe.device, plan.recipe.dtype],
                          sort_keys=True, default=str)

    def context(self, plan: CheckedRecipe) -> BuildContext:
        recipe = plan.recipe
        context = BuildContext(device=torch.device(recipe.device), dtype=DTYPES[recipe.dtype], seed=recipe.seed)
        key = self._key(plan, "model")
        if key not in self.models:
            self.models[key] = plan.built("model", context)
        context.model = self.models[key]
        return context

    def pipeline(self, plan: CheckedRecipe) -> Pipeline:
        recipe = plan.recipe
        context = self.context(plan)
        solver, combiner = plan.built("solver", context), plan.built("combiner", context)
        conditions = [Condition(spec.name or spec.kind, plan.built(f"conditions.{i}", context), spec.rule,
                                spec.scale, spec.start, spec.stop, spec.time_travel)
                      for i, spec in enumerate(recipe.conditions)]
        return Pipeline(context.model, solver, combiner, conditions, steps=recipe.solver.steps,
                        device=context.device)


# -- pre-flight ---------------------------------------------------------------------------------
def _problem_text(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, ZmagicError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def preflight(exp: Experiment, registry=None, builder: Optional[Builder] = None,
              device: Optional[str] = None) -> dict[tuple[str, int], CheckedRecipe]:
    """Check every (variant, row) and build each model and condition once; raise one ConfigError
    listing every problem (missing plugins, bad options, missing files, missing weights) when any."""
    builder = builder or Builder()
    problems: dict[str, list[str]] = {}  # message -> where

    def note(message: str, where: str) -> None:
        problems.setdefault(message, []).append(where)

    plans: dict[tuple[str, int], CheckedRecipe] = {}
    missing: set[str] = set()
    for variant in exp.variants:
        for row in exp.rows:
            where = f"variant {variant}, {row.source}"
            try:
                recipe = exp.recipe(variant, row, device)
                plan = check_recipe(recipe, registry)
            except ZmagicError as exc:
                note(_problem_text(exc).replace(f"variant {variant}, {row.source}: ", ""), where)
                continue
            plans[(variant, row.index)] = plan
            for option, found in referenced_files(plan).items():
                if "missing" in found:
                    missing.add(str(found["missing"]))
                    note(f"{option}: file not found: {found['missing']}", where)
            for key, value in _file_values(recipe):
                if not Path(value).expanduser().exists():
                    missing.add(value)
                    note(f"{key}: file not found: {value}", where)
    # build each model, and every condition of the first row, once: missing weights show here
    built_energies: set[str] = set()
    failed_models: dict[str, str] = {}
    for (variant, index), plan in plans.items():
        model_key = builder._key(plan, "model")
        context = None
        if model_key not in failed_models:
            try:
                context = builder.context(plan)
            except Exception as exc:  # noqa: BLE001 - every failure is a problem to report, with its type
                failed_models[model_key] = f"model ({plan.recipe.model.kind}): {_problem_text(exc)}"
        if model_key in failed_models and f"variant {variant}" not in problems.get(failed_models[model_key], []):
            note(failed_models[model_key], f"variant {variant}")
        for where in plan.parts:
            if where == "model":
                continue
            reg, options = plan.parts[where]
            key = json.dumps([where, reg.name, options], sort_keys=True, default=str)
            if where.startswith("conditions.") and (key in built_energies or index != exp.rows[0].index):
                continue
            built_energies.add(key)
            try:
                plan.built(where, context or BuildContext(device=torch.device(plan.recipe.device)))
            except Exception as exc:  # noqa: BLE001
                if any(m in str(exc) for m in missing):
                    continue  # a missing file, reported above
                if context is None and not isinstance(exc, (InputError,)) and "weights" not in str(exc).lower():
                    continue  # it needed the model, which failed: reported above
                note(f"{where} ({reg.name}): {_problem_text(exc)}", f"variant {variant}, {exp.rows[index].source}")
    if problems:
        lines = []
        for message, wheres in problems.items():
            shown = ", ".join(wheres[:3]) + (f" and {len(wheres) - 3} more" if len(wheres) > 3 else "")
            lines.append(f"  - {message} [{shown}]")
        raise ConfigError(f"experiment {exp.name}: pre-flight found {len(problems)} problem(s); nothing was "
                          "generated:\n" + "\n".join(lines))
    return plans


def _file_values(recipe: Recipe):
    """(field, value) of the string options that name files (by their ending), for the existence check."""
    specs = [("model", recipe.model)] + [(f"conditions.{i}", c) for i, c in enumerate(recipe.conditions)]
    for where, spec in specs:
        for key, value in spec.options.items():
            if isinstance(value, str) and value.lower().endswith(FILE_SUFFIXES):
                yield f"{where}.{key}", value


# -- the experiment folder ------------------------------------------------------------------------
def check_experiment_folder(out: Path, exp: Experiment) -> dict:
    """Raise unless ``out`` is new or holds this experiment; returns the identity to record."""
    identity = exp.identity()
    ident = identity_hash(identity)
    marker = Path(out) / MARKER
    data = _read_json(marker)
    if data is None:
        if marker.exists():
            raise ConfigError(f"{marker} is unreadable; choose another --out or remove the folder")
        strays = [p.name for p in Path(out).iterdir()] if Path(out).is_dir() else []
        strays = [n for n in strays if not n.startswith(".") and n not in exp.variants]
        if strays:
            raise ConfigError(f"output folder {out} holds other files ({', '.join(sorted(strays)[:3])}); "
                              "choose another --out")
        return {"identity": identity, "identity_sha256": ident}
    if not isinstance(data, dict) or data.get("identity_sha256") != ident:
        old = data.get("identity") if isinstance(data, dict) else {}
        diff = _experiment_differences(old or {}, identity)
        raise ConfigError(f"output folder {out} holds a different experiment (differs in: "
                          f"{', '.join(diff) or 'unknown'}); choose another --out or remove the folder")
    return {"identity": identity, "identity_sha256": ident}


def _experiment_differences(old: dict, new: dict) -> list[str]:
    out = []
    if old.get("seed") != new.get("seed"):
        out.append(f"seed ({old.get('seed')} -> {new.get('seed')})")
    out += [f"recipe.{d}" if d != "recipe" else d for d in identity_differences(
        {"recipe": old.get("recipe")}, {"recipe": new.get("recipe")})]
    for part in ("variants", "rows"):
        a, b = old.get(part) or {}, new.get(part) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                what = "added" if key not in a else "removed" if key not in b else "changed"
                out.append(f"{part[:-1]} {key} ({what})")
    return out


# -- processes ------------------------------------------------------------------------------------
class Processes:
    """This process's place among the launched ones: accelerate's PartialState under torchrun or
    ``accelerate launch`` (WORLD_SIZE > 1), else a single process (accelerate is not imported)."""

    def __init__(self, cpu: bool):
        self.state = None
        self.index, self.count, self.device = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            try:
                from accelerate import PartialState
            except ImportError:
                raise ConfigError("several processes were launched (WORLD_SIZE > 1) but accelerate is not "
                                  "installed: pip install accelerate (the diffusers extra has it)") from None
            self.state = PartialState(cpu=cpu)
            self.index, self.count = self.state.process_index, self.state.num_processes
            self.device = None if cpu else str(self.state.device)

    @property
    def main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def mine(self, units: list) -> list:
        """This process's share of ``units``: contiguous, sizes differing by at most one."""
        if self.state is None:
            return list(units)
        with self.state.split_between_processes(list(units)) as part:
            return list(part)

    def gather(self, obj) -> list:
        """Every process's ``obj``, in process order (main gets them all)."""
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])


@dataclass
class UnitResult:
    """What one process did, by run folder: samples generated, seconds spent, failures (index -> message)."""

    generated: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)

    def merge(self, other: "UnitResult") -> None:
        for k, v in other.generated.items():
            self.generated[k] = self.generated.get(k, 0) + v
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
        for k, v in other.errors.items():
            self.errors.setdefault(k, {}).update(v)


def _unit_lock(unit: Unit) -> str:
    return f".zmagic.samples-{unit.indices[0]:05d}.lock"


def generate_units(exp: Experiment, out: Path, plans: dict, units: list[Unit], builder: Builder,
                   progress: bool = False, log=None) -> UnitResult:
    """Generate the pending samples of ``units`` (this process's share); resumable per sample."""
    result = UnitResult()
    rows = {r.index: r for r in exp.rows}
    current, pipeline, ident, folder = None, None, None, None
    unbuildable: dict[tuple[str, int], str] = {}  # a folder whose pipeline failed to build: why
    for unit in units:
        row = rows[unit.row]
        plan = plans[(unit.variant, unit.row)]
        out_dir = exp.folder(out, unit.variant, row)
        if current != (unit.variant, unit.row):
            current, pipeline = (unit.variant, unit.row), None
            identity = folder_identity(plan)
            ident = identity_hash(identity)
            _make_folder(out_dir)
        seeds = plan.recipe.sample_seeds()
        with lock_folder(out_dir, _unit_lock(unit)):
            folder = _Folder(out_dir, plan.recipe, identity, ident, _check_marker(out_dir, identity, ident))
            pending = [i for i in unit.indices if _trusted(out_dir, i, seeds[i], ident) is None]
            if not pending:
                continue
            started = time.perf_counter()
            if pipeline is None and current not in unbuildable:
                try:
                    pipeline = builder.pipeline(plan)
                except Exception as exc:  # noqa: BLE001 - e.g. a row's reference with no face: the other rows go on
                    unbuildable[current] = f"building its conditions failed: {_problem_text(exc)}"
            if current in unbuildable:
                for i in pending:
                    result.errors.setdefault(str(out_dir), {})[str(i)] = unbuildable[current]
                continue
            batch = [seeds[i] for i in unit.indices]  # the whole batch, as an uninterrupted run draws it
            run = pipeline.run(batch, batch_size=len(batch), progress=progress)
            by_seed = {s: k for k, s in enumerate(run.seeds)}
            key = str(out_dir)
            for i in pending:
                if seeds[i] in run.errors:
                    result.errors.setdefault(key, {})[str(i)] = run.errors[seeds[i]]
                    continue
                k = by_seed[seeds[i]]
                folder.write_sample(i, seeds[i], run.samples[k], run.images[k], run.trace[k],
                                    _final_energies(pipeline, run.images[k:k + 1]))
                result.generated[key] = result.generated.get(key, 0) + 1
            result.seconds[key] = result.seconds.get(key, 0.0) + time.perf_counter() - started
            if log:
                log(f"{unit.variant}/{row.key}: samples {unit.indices[0]}-{unit.indices[-1]} done")
    return result


def aggregate_folder(exp: Experiment, out: Path, variant: str, row: Row, plan: CheckedRecipe, builder: Builder,
                     errors: dict[str, str], seconds: float, generated: int) -> dict:
    """record.json, grid and plots, and the per-run evaluators of one (variant, row) folder (main only)."""
    out_dir = exp.folder(out, variant, row)
    _make_folder(out_dir)
    with lock_folder(out_dir):
        clean_temporaries(out_dir)
        identity = folder_identity(plan)
        ident = identity_hash(identity)
        folder = _Folder(out_dir, plan.recipe, identity, ident, _check_marker(out_dir, identity, ident))
        seeds = plan.recipe.sample_seeds()
        records = [r for r in (_trusted(out_dir, i, s, ident) for i, s in enumerate(seeds)) if r is not None]
        if records:
            folder.mark()
        pipeline = builder.pipeline(plan) if records else None
        return _aggregate(folder, plan, seeds, records, pipeline, errors, seconds, generated)


def folder_records(exp: Experiment, out: Path):
    """("variant/row", record.json) of every run folder of the experiment that has one."""
    for variant in exp.variants:
        for row in exp.rows:
            record = _read_json(exp.folder(out, variant, row) / RECORD)
            if isinstance(record, dict):
                yield f"{variant}/{row.key}", record


def run_experiment(exp: Experiment, out: Path, registry=None, progress: bool = False, evaluate: bool = True,
                   log=print, builder: Optional[Builder] = None) -> Optional[dict]:
    """Pre-flight, generate this process's units, then (main process) aggregate and evaluate.
    Returns the evaluation (main process; None elsewhere or without ``evaluate``).  ``builder``: pass one
    to keep loaded models across several experiments (`zmagic tune` runs one per candidate)."""
    out = Path(out)
    if exp.spec.threads:
        torch.set_num_threads(exp.spec.threads)
    device = exp.spec.device or exp.base.get("device") or "cpu"
    procs = Processes(cpu=torch.device(device).type == "cpu")
    say = log if (procs.main and log) else (lambda *a, **k: None)
    builder = builder or Builder()
    plans = preflight(exp, registry, builder, device=procs.device)   # raises before anything is written
    check_experiment_folder(out, exp)
    started = time.perf_counter()
    _make_folder(out)
    lock_name = EXPERIMENT_LOCK if procs.main else f".zmagic-experiment.{procs.index}.lock"
    with lock_folder(out, lock_name):
        marker = check_experiment_folder(out, exp)
        if procs.main:
            write_json(out / MARKER, {"format": FORMAT, **marker, "name": exp.name,
                                      "experiment": exp.spec.model_dump(mode="json", exclude={"recipe"}),
                                      "recipe": exp.base, "recipe_dir": str(exp.recipe_dir),
                                      "source": str(exp.path) if exp.path else None},
                       indent=2)
        units = exp.units(lambda v, r: plans[(v, r.index)].recipe.batch_size)
        mine = procs.mine(units)
        say(f"experiment {exp.name}: {len(exp.variants)} variants x {len(exp.rows)} rows x "
            f"{exp.spec.samples_per_row} samples = {len(units)} units over {procs.count} process(es)")
        procs.barrier()
        result = generate_units(exp, out, plans, mine, builder, progress,
                                log=(lambda m: print(f"[process {procs.index}] {m}", flush=True)) if progress else None)
        results = procs.gather(result)  # the main process gets every process's result
        total = UnitResult()
        for r in results:
            total.merge(r)
        procs.barrier()
        # every folder is complete: the processes aggregate a share of the folders each
        # (record.json, grid and plots, per-run evaluators), then the main one evaluates the experiment
        folders = [(variant, row) for variant in exp.variants for row in exp.rows]
        shared = total  # gather_object gathers into every process
        for variant, row in procs.mine(folders):
            key = str(exp.folder(out, variant, row))
            aggregate_folder(exp, out, variant, row, plans[(variant, row.index)], builder,
                             shared.errors.get(key, {}), shared.seconds.get(key, 0.0), shared.generated.get(key, 0))
        procs.barrier()
        evaluation = None
        if procs.main:
            failed = sum(len(v) for v in total.errors.values())
            say(f"generated {sum(total.generated.values())} samples in {time.perf_counter() - started:.1f} s"
                + (f"; {failed} failed (see 'failed' in their folders' record.json)" if failed else ""))
            for where, record in folder_records(exp, out):  # what a run did not do as asked, as generate warns
                for line in problem_messages(record.get("problems") or {}):
                    say(f"warning: {where}: {line}")
            if evaluate:
                from zmagic_core.app.evaluation import evaluate_experiment

                evaluation = evaluate_experiment(out, exp=exp, builder=builder, registry=registry, log=say)
        procs.barrier()
    return evaluation
