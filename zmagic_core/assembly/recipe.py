"""Recipes: one file (YAML or JSON) that describes a whole run, checked before anything loads.

Component options sit beside ``kind`` (``combiner: {kind: cagrad, c: 0.4}``) or under
``options``; any field can be overridden with ``path.to.field=value`` (``--set`` on the CLI).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from zmagic_core.contracts.errors import ConfigError, InputError


class ComponentSpec(BaseModel):
    """A component by kind, with its options; unknown keys beside ``kind`` become options."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_options(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"kind": data}
        if not isinstance(data, dict):
            return data
        fields = set(cls.model_fields)
        extra = {k: v for k, v in data.items() if k not in fields}
        if not extra:
            return data
        kept = {k: v for k, v in data.items() if k in fields}
        kept["options"] = {**(data.get("options") or {}), **extra}
        return kept


class ModelSpec(ComponentSpec):
    kind: str = "shapes"


class SolverSpec(ComponentSpec):
    kind: str = "ddpm"
    steps: int = Field(100, ge=1, le=1000, description="number of visited timesteps")


class CombinerSpec(ComponentSpec):
    kind: str = "sum"


class ConditionSpec(ComponentSpec):
    name: Optional[str] = Field(None, description="label in traces and records (default: the kind)")
    rule: Literal["fixed", "constant", "adaptive"] = "adaptive"
    scale: float = Field(1.0, ge=0)
    start: int = Field(1000, ge=0, description="guidance active for stop <= t <= start")
    stop: int = Field(0, ge=0)
    time_travel: int = Field(0, ge=0, le=50, description="repeats of each step inside the window")

    @model_validator(mode="after")
    def _window(self):
        if self.stop > self.start:
            raise ValueError(f"window is empty: stop ({self.stop}) > start ({self.start})")
        return self


class Recipe(BaseModel):
    """Everything a run needs."""

    model_config = ConfigDict(extra="forbid")
    model: ModelSpec = Field(default_factory=ModelSpec)
    solver: SolverSpec = Field(default_factory=SolverSpec)
    combiner: CombinerSpec = Field(default_factory=CombinerSpec)
    conditions: list[ConditionSpec] = Field(default_factory=list)
    seed: int = Field(0, ge=0, description="seed of sample 0; sample i uses seed + i")
    num_samples: int = Field(4, ge=1)
    seeds: Optional[list[int]] = Field(None, description="explicit per-sample seeds (overrides seed/num_samples)")
    batch_size: int = Field(8, ge=1)
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    output: Optional[str] = None
    progress: bool = True

    _plan: Any = PrivateAttr(default=None)  # the CheckedRecipe once checked: checked once per run
    _source_dir: Optional[str] = PrivateAttr(default=None)  # folder of the recipe file: base of relative paths

    def sample_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else [self.seed + i for i in range(self.num_samples)]


# -- reading -----------------------------------------------------------------------------------
def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{loc or 'recipe'}: {err['msg']}{shown}")
    return "invalid recipe:\n  " + "\n  ".join(lines)


def apply_override(data: dict, assignment: str) -> None:
    """Set ``a.b.0.c=value`` in nested dicts and lists; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like path.to.field=value")
    path, raw = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {assignment!r} names no field")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {assignment!r}: no item {key} in {'.'.join(keys[:i]) or 'recipe'}")
            node = node[int(key)]
            continue
        if isinstance(node.get(key), str):  # shorthand `combiner: sum` becomes a mapping
            node[key] = {"kind": node[key]}
        if key not in node or node[key] is None:
            node[key] = [] if nxt.isdigit() else {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {assignment!r}: no item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def read_recipe(source: Union[str, Path, dict], overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read, override and validate a recipe's fields (file path or dict); ConfigError names what is
    wrong.  Kinds and options are checked against the plugins by ``assembly.build.check_recipe``."""
    if isinstance(source, dict):
        data = json.loads(json.dumps(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"recipe file not found: {path}")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot parse recipe {path}: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read recipe {path}: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a mapping of fields, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    if not isinstance(source, dict):
        recipe._source_dir = str(Path(source).resolve().parent)
    return recipe


def recipe_identity(recipe: Recipe) -> dict:
    """The fields that decide what a sample looks like (not how many, where, or how fast)."""
    data = recipe.model_dump(mode="json")
    for key in ("seed", "num_samples", "seeds", "batch_size", "output", "progress", "device"):
        data.pop(key, None)
    return data


